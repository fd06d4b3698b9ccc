"""Live sources that match deployments: an RTSP camera (a loopback RTSP server in the test that
streams RTP/JPEG, RFC 2435, over the RTSP connection), its transport option, camera devices,
GStreamer pipelines. Fault tests as for every source: a camera that disconnects (reconnect),
one that stalls (open/read timeout, then the stream ends), a slow consumer (oldest frames
dropped, counted)."""
from __future__ import annotations

import os
import socket
import stat
import struct
import threading
import time

import cv2
import numpy as np
import pytest

from keepbits.errors import InputError
from keepbits.runtime import open_source
from keepbits.runtime.sources import is_gstreamer_pipeline
from keepbits.runtime.video import has_backend

SDP = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=keepbits test\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=video 0 RTP/AVP 26\r\na=control:track1\r\n"
PATCH = (250, 200, 40)  # RGB colour of the moving square


def _frame(k: int) -> np.ndarray:
    """RGB 64×48: dark, with a coloured square that moves with k."""
    frame = np.full((48, 64, 3), 20, np.uint8)
    frame[8:24, (k * 3) % 40:(k * 3) % 40 + 16] = PATCH
    return frame


def _rtp_jpeg(frame: np.ndarray, seq: int, timestamp: int) -> tuple[list[bytes], int]:
    """RTP packets (payload type 26, RFC 2435: type 1 = 4:2:0, Q = 255 with in-band tables) of one frame."""
    params = [cv2.IMWRITE_JPEG_QUALITY, 85, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420]
    data = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), params)[1].tobytes()
    tables, i = b"", 2
    while True:  # walk the JPEG segments: keep the quantisation tables, stop at the scan
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        segment = data[i + 4:i + 2 + length]
        if marker == 0xDB:
            tables += b"".join(segment[k + 1:k + 65] for k in range(0, len(segment), 65))
        if marker == 0xDA:
            scan = data[i + 2 + length:data.rindex(b"\xff\xd9")]
            break
        i += 2 + length
    packets, offset = [], 0
    while offset < len(scan):
        part = scan[offset:offset + 1200]
        last = offset + len(part) >= len(scan)
        header = b"\0" + offset.to_bytes(3, "big") + bytes([1, 255, frame.shape[1] // 8, frame.shape[0] // 8])
        if offset == 0:
            header += b"\0\0" + struct.pack(">H", len(tables)) + tables
        rtp = bytes([0x80, (0x80 if last else 0) | 26]) + struct.pack(">HII", seq & 0xFFFF, timestamp, 0x4B42)
        packets.append(rtp + header + part)
        offset, seq = offset + len(part), seq + 1
    return packets, seq


class RtspCamera:
    """A loopback RTSP server: connection k (from 1) streams ``frames[k]`` frames (None: stalls at
    SETUP, never answering), then closes. Records each SETUP's Transport header."""

    def __init__(self, frames: list[int | None]):
        self.frames, self.transports, self.connections = frames, [], 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"rtsp://127.0.0.1:{self.server.getsockname()[1]}/cam"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            plan = self.frames[min(self.connections, len(self.frames)) - 1]
            threading.Thread(target=self._serve, args=(conn, plan), daemon=True).start()

    def _serve(self, conn: socket.socket, frames: int | None) -> None:
        buffer = b""
        with conn:
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    lines = head.decode().split("\r\n")
                    method, headers = lines[0].split()[0], dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
                    reply = f"RTSP/1.0 200 OK\r\nCSeq: {headers.get('CSeq', '0')}\r\n"
                    if method == "OPTIONS":
                        conn.sendall(f"{reply}Public: OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN\r\n\r\n".encode())
                    elif method == "DESCRIBE":
                        conn.sendall(f"{reply}Content-Base: {self.url}/\r\nContent-Type: application/sdp\r\n"
                                     f"Content-Length: {len(SDP)}\r\n\r\n{SDP}".encode())
                    elif method == "SETUP":
                        self.transports.append(headers.get("Transport", ""))
                        if frames is None:
                            continue  # a stalled camera: no answer
                        conn.sendall(f"{reply}Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\nSession: 4b42\r\n\r\n".encode())
                    elif method == "PLAY":
                        conn.sendall(f"{reply}Session: 4b42\r\nRange: npt=0.000-\r\n\r\n".encode())
                        seq = 0
                        for k in range(frames):
                            packets, seq = _rtp_jpeg(_frame(k), seq, k * 4500)
                            for packet in packets:
                                conn.sendall(b"$\0" + struct.pack(">H", len(packet)) + packet)
                            time.sleep(0.02)
                        return  # the camera goes away

    def close(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread, which then ends
        self.server.close()


def test_rtsp_camera_streams_reconnects_after_a_disconnect_and_drops_for_a_slow_consumer():
    camera = RtspCamera([20, 20, None])  # two sessions of 20 frames, then a camera that stalls
    source = open_source(camera.url, rtsp_transport="tcp", read_timeout=1.0, stall_timeout=10, max_reconnects=1)
    got = []
    try:
        with source:
            while (frame := source.get()) is not None:
                got.append(frame)
                time.sleep(0.06)  # slower than the camera's 50 frames/s
    finally:
        camera.close()
    stats = source.stats()
    assert source.live and camera.connections == 3 and stats["reconnects"] == 2 and stats["errors"] == 3
    assert stats["read"] == 40 and stats["dropped"] > 0 and stats["delivered"] + stats["dropped"] == stats["read"] == 40
    assert [f.index for f in got] == sorted(f.index for f in got) and got[0].image.shape == (48, 64, 3)
    first, k = got[0].image.astype(int), got[0].index % 20  # frames may drop before the first delivery: the k-th of a session
    centre = (k * 3) % 40 + 8  # the moving square's middle column in frame k (_frame)
    assert np.abs(first[16, centre] - PATCH).max() < 24 and np.abs(first[40, 60] - 20).max() < 24  # JPEG-close to what was sent
    assert all("RTP/AVP/TCP" in t for t in camera.transports)


@pytest.mark.parametrize("transport, header", [("tcp", "RTP/AVP/TCP"), ("udp", "RTP/AVP/UDP")])
def test_rtsp_transport_reaches_ffmpeg_and_a_stalled_camera_times_out(transport, header):
    camera = RtspCamera([None])
    before = os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS")
    source = open_source(camera.url, rtsp_transport=transport, read_timeout=0.3, stall_timeout=10, max_reconnects=1)
    try:
        with source:
            assert source.get() is None
    finally:
        camera.close()
    stats = source.stats()
    assert camera.connections == 2 and stats["errors"] == 2 and stats["reconnects"] == 1 and stats["read"] == 0
    assert len(camera.transports) == 2 and all(t.startswith(header) for t in camera.transports)
    assert os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS") == before
    with pytest.raises(InputError, match="rtsp_transport"):
        open_source(camera.url, rtsp_transport="quic")


@pytest.mark.skipif(not (os.path.exists("/dev/null") and stat.S_ISCHR(os.stat("/dev/null").st_mode)), reason="needs a character device")
def test_a_device_path_is_a_live_camera_that_reconnects_then_ends():
    """/dev/video* are character devices: live, reopened after a failure. /dev/null is one that
    no capture back-end opens: every attempt fails, max_reconnects ends the stream."""
    source = open_source("/dev/null", read_timeout=0.2, stall_timeout=10, max_reconnects=1)
    with source:
        assert source.get() is None
    stats = source.stats()
    assert source.live and source.name == "null" and stats["errors"] == 2 and stats["reconnects"] == 1
    with pytest.raises(InputError, match="not found"):
        open_source("/dev/video-that-is-not-there")


def test_gstreamer_pipelines_need_an_opencv_with_gstreamer():
    pipeline = "videotestsrc num-buffers=5 ! video/x-raw,width=32,height=24 ! videoconvert ! appsink"
    assert is_gstreamer_pipeline(pipeline) and not is_gstreamer_pipeline("rtsp://cam/a ! b") and not is_gstreamer_pipeline("a.mp4")
    if not has_backend("GSTREAMER"):
        with pytest.raises(InputError, match="no GStreamer back-end"):
            open_source(pipeline)
        return
    source = open_source(pipeline, live=False)
    frames = list(source)
    assert len(frames) == 5 and frames[0].image.shape == (24, 32, 3)
