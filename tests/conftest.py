"""Shared fixtures. Tests never read ../shared: data is generated or the bundled MNIST sample."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def tiny_npz(tmp_path):
    """A 3-class colour data set (60 images of 16×16) whose class is the bright quadrant."""
    rng = np.random.default_rng(0)
    n = 60
    y = np.arange(n) % 3
    x = rng.integers(0, 60, size=(n, 16, 16, 3), dtype=np.uint8)
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        x[i, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] += 150
    path = tmp_path / "tiny.npz"
    np.savez(path, x=x, y=y, class_names=np.array(["a", "b", "c"]))
    return path


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A real Mosquitto broker on 127.0.0.1:``port`` (a config file binds the loopback only) that
    a test can stop, start again on the same port, and freeze (SIGSTOP) and thaw (SIGCONT)."""

    def __init__(self, binary: str, folder, port: int):
        self.binary, self.port = binary, port
        self.config = folder / "mosquitto.conf"
        self.config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_type all\n")
        self.log = folder / "mosquitto.log"
        self.process = None

    def start(self) -> "Broker":
        import subprocess
        import time

        self.process = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start on port {self.port}: {self.log.read_text()[-500:]}")

    def logged(self, text: str, timeout: float = 10.0) -> bool:
        """Wait until the broker's log holds ``text`` (e.g. ``"Received SUBSCRIBE"``)."""
        import time

        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()
            self.process.terminate()
            self.process.wait(10)

    def pause(self) -> None:
        import signal

        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


@pytest.fixture
def mosquitto(tmp_path, free_port):
    """A running Mosquitto broker on a free loopback port (Debian package ``mosquitto``; CI
    installs it in .ci/run). Skipped, saying why, where the binary is absent."""
    import shutil

    pytest.importorskip("paho.mqtt", reason="paho-mqtt (keepbits[mqtt]) is not installed")
    binary = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)
    if binary is None:
        pytest.skip("the mosquitto broker is not installed (apt-get install mosquitto; .ci/run installs it)")
    broker = Broker(binary, tmp_path, free_port).start()
    yield broker
    broker.stop()
