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


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: tiny models only lose time to thread hand-offs on a busy machine."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """``write(name, source)``: a Python module importable by this process and by the
    subprocesses it starts (``sys.path`` and ``PYTHONPATH``), as a user's own model module is."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))

    def write(name: str, source: str):
        (folder / f"{name}.py").write_text(source)
        return folder

    return write


def _float64_backselect(net, x, target):
    """Obviously correct BackSelect (the reference for every SIS path): every remaining candidate
    image through the whole float64 model, masked value 0, lowest index within the tie tolerance.
    Returns the order and the softmax score of the target after each step."""
    import torch

    from keepbits.audit.sis import TIE_TOLERANCE

    net = net.double().eval()
    c, h, w = x.shape
    cur = torch.as_tensor(x, dtype=torch.float64).clone()

    def margins(images):  # z_t - logsumexp of the other logits: softmax_t = sigmoid(margin)
        with torch.no_grad():
            z = net(images)
        others = torch.cat([z[:, :target], z[:, target + 1 :]], 1)
        return (z[:, target] - torch.logsumexp(others, 1)).tolist()

    remaining, order, scores = list(range(h * w)), [], margins(cur[None])
    while remaining:
        trials = cur.repeat(len(remaining), 1, 1, 1)
        for i, p in enumerate(remaining):
            trials[i, :, p // w, p % w] = 0.0
        s = margins(trials)
        k = next(i for i, v in enumerate(s) if v >= max(s) - TIE_TOLERANCE)
        p = remaining.pop(k)
        cur[:, p // w, p % w] = 0.0
        order.append(p)
        scores.append(s[k])
    return np.array(order), 1.0 / (1.0 + np.exp(-np.array(scores)))


@pytest.fixture
def float64_backselect():
    """The reference BackSelect, ``(net, x C×H×W, target) → (order, scores)``."""
    pytest.importorskip("torch")
    return _float64_backselect
