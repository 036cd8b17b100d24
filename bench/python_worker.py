#!/usr/bin/env python3
"""The Python alternative that issue 4 measures the Rust worker against.

A strong, straightforward Python worker speaking the same wire contract:
nats-py (queue group `profile-workers` on `profiles.images`, answers on
`profiles.gender` / `profiles.errors`), libjpeg-turbo decoding through
simplejpeg at reduced DCT scale, OpenCV INTER_AREA resize to 64x64, and ONNX
Runtime running the original project's network (three 3x3 convs of 32, 32 and
64 filters with ReLU and 2x2 max-pooling, batch norm folded away, a dense
layer of 64 and a 2-way softmax) at 64x64 on one intra-op thread. The same
micro-batching policy as the Rust worker: a batch takes whatever is queued, up
to --max-batch, as soon as the model is free; inference runs in a thread (ONNX
Runtime releases the GIL) while the event loop keeps receiving and decoding.

The weights are random: this process is for speed, not accuracy.

    python_worker.py --url nats://127.0.0.1:4222 [--max-batch 32]
    python_worker.py --bench-model     (model only: pictures/s at batch 32, one thread)
"""

import argparse
import asyncio
import json
import time

import cv2
import nats
import numpy as np
import onnx
import onnxruntime as ort
import simplejpeg
from onnx import TensorProto, helper, numpy_helper

SIZE = 64


def build_model() -> bytes:
    """The original 3-conv network as an ONNX graph, NCHW float input."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def param(name, shape, scale):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    x = "input"
    cin = 3
    for i, cout in enumerate([32, 32, 64]):
        w = param(f"w{i}", (cout, cin, 3, 3), (2.0 / (9 * cin)) ** 0.5)
        b = param(f"b{i}", (cout,), 0.01)
        nodes += [
            helper.make_node("Conv", [x, w, b], [f"c{i}"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
            helper.make_node("MaxPool", [f"r{i}"], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]),
        ]
        x, cin = f"p{i}", cout
    nodes.append(helper.make_node("Flatten", [x], ["flat"]))
    feat = cin * (SIZE // 8) ** 2
    nodes += [
        helper.make_node("Gemm", ["flat", param("fw", (64, feat), feat**-0.5), param("fb", (64,), 0.01)], ["d"], transB=1),
        helper.make_node("Relu", ["d"], ["dr"]),
        helper.make_node("Gemm", ["dr", param("ow", (2, 64), 0.125), param("ob", (2,), 0.01)], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "profile_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def decode(payload: bytes) -> np.ndarray:
    """JPEG bytes to a normalised CHW float32 array."""
    rgb = simplejpeg.decode_jpeg(payload, colorspace="RGB", min_height=SIZE, min_width=SIZE)
    small = cv2.resize(rgb, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return (small.astype(np.float32) * (2.0 / 255.0) - 1.0).transpose(2, 0, 1)


def open_session() -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(build_model(), opts, providers=["CPUExecutionProvider"])


def bench_model(batch: int = 32, seconds: float = 3.0) -> None:
    """Prints the model-only rate at `batch`, one thread, after a warm-up."""
    session = open_session()
    x = np.random.default_rng(1).random((batch, 3, SIZE, SIZE), dtype=np.float32)
    for _ in range(20):
        session.run(None, {"input": x})
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {"input": x})
        runs += 1
    print(json.dumps({"batch": batch, "pictures_per_s": runs * batch / (time.perf_counter() - start)}))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="nats://127.0.0.1:4222")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--bench-model", action="store_true")
    args = ap.parse_args()
    if args.bench_model:
        bench_model()
        return

    session = open_session()
    nc = await nats.connect(args.url)
    queue: asyncio.Queue = asyncio.Queue()
    labels = ("female", "male")

    async def on_request(msg):
        received = time.perf_counter()
        userid = (msg.headers or {}).get("userid")
        if userid is None:
            await nc.publish("profiles.errors", json.dumps({"userid": None, "error": "missing_userid", "detail": "no userid header"}).encode())
            return
        try:
            x = decode(msg.data)
        except Exception as e:  # noqa: BLE001 - any decoder failure is the client's
            await nc.publish("profiles.errors", json.dumps({"userid": userid, "error": "undecodable_image", "detail": str(e)}).encode())
            return
        queue.put_nowait((userid, x, received))

    await nc.subscribe("profiles.images", queue="profile-workers", cb=on_request)
    loop = asyncio.get_running_loop()
    while True:
        batch = [await queue.get()]
        while len(batch) < args.max_batch and not queue.empty():
            batch.append(queue.get_nowait())
        x = np.stack([b[1] for b in batch])
        probs = await loop.run_in_executor(None, lambda: session.run(None, {"input": x})[0])
        for (userid, _, received), p in zip(batch, probs):
            k = int(p.argmax())
            body = {
                "userid": userid,
                "gender": labels[k],
                "confidence": float(p[k]),
                "scores": {labels[0]: float(p[0]), labels[1]: float(p[1])},
                "model": "python-onnx/random",
                "latency_ms": (time.perf_counter() - received) * 1e3,
            }
            await nc.publish("profiles.gender", json.dumps(body).encode(), headers={"userid": userid})


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
