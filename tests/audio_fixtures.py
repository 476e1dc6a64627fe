"""Audio built by tests: files that are cheap to make and expensive to decode."""

from __future__ import annotations

import io

import av
import numpy as np


def silent_opus(seconds: float, container_format: str) -> bytes:
    """Opus silence, built by muxing one encoded 20 ms packet over and over (cheap even for hours)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream("libopus", rate=48000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="flt", layout="mono")
        frame.sample_rate = 48000
        packets = []
        for index in range(10):
            frame.pts = index * 960
            packets += stream.encode(frame)
        for packet in packets:
            container.mux(packet)
        template = packets[-1]
        pts, step = template.pts or 0, template.duration or 960
        for _ in range(round(seconds * 50) - len(packets)):
            pts += step
            copy = av.Packet(bytes(template))
            copy.pts = copy.dts = pts
            copy.duration, copy.time_base, copy.stream = template.duration, template.time_base, stream
            container.mux(copy)
    return buffer.getvalue()


def video_only(container_format: str = "mp4", codec: str = "mpeg4") -> bytes:
    """A valid container with one short video stream and no audio stream."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=10)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for index in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()
