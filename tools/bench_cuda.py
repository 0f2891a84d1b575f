"""CUDA benchmark of quantkit's nf4 linear (torch.ops.quantkit.lut4_linear) on a GPU.

Per (shape N x K, batch m): median time over --reps calls (CUDA events around each call,
the L2 cache flushed between calls by writing a buffer larger than it), the effective GB/s
of the weight bytes read (packed codes + scales), that as a % of the device-to-device copy
bandwidth measured in the same run, and ratios against cuBLAS fp16 (torch.matmul on the
dense fp16 weight) and against bitsandbytes' matmul_4bit when bitsandbytes imports with CUDA
(else against "dequantize + matmul" in torch).

    python tools/bench_cuda.py                    # all shapes, batch 1 4 16 64 256
    python tools/bench_cuda.py --quick            # two shapes, fewer reps
    python tools/bench_cuda.py --out docs/cuda_bench.md

Needs a GPU and a CUDA build of quantkit._C (README, "CUDA build").
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys

import torch

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (8192, 8192), (28672, 8192)]
BATCHES = [1, 4, 16, 64, 256]


def _timed(fn, reps: int, flush: torch.Tensor) -> float:
    """Median milliseconds of fn() over reps calls, each after an L2 flush."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _copy_bandwidth(flush: torch.Tensor) -> float:
    """Device-to-device copy GB/s (bytes read + written) of a 1 GiB buffer."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _timed(lambda: dst.copy_(src), 10, flush)
    del src, dst
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def _driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, batch 1 and 16, 20 reps")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--out", help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device; run this on a GPU machine", file=sys.stderr)
        return 2
    import quantkit._ops as ops
    from quantkit.formats import lut4

    if not ops._has_cuda_kernels():
        print(f"bench_cuda: quantkit._C has no CUDA kernels ({ops.native_status()}); see README 'CUDA build'",
              file=sys.stderr)
        return 2
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception:  # noqa: BLE001 (any import failure means: no peer)
        bnb = None
    shapes, batches, reps = (SHAPES[:2], [1, 16], 20) if args.quick else (SHAPES, BATCHES, args.reps)
    dtype = getattr(torch, args.dtype)
    dev = "cuda"
    flush = torch.empty(int(torch.cuda.get_device_properties(0).L2_cache_size * 4), dtype=torch.uint8, device=dev)
    copy_gbs = _copy_bandwidth(flush)
    props = torch.cuda.get_device_properties(0)
    head = [f"GPU: {props.name}, driver {_driver()}, torch {torch.__version__}, {datetime.date.today()}",
            f"command: python tools/bench_cuda.py {' '.join(argv or sys.argv[1:])}",
            f"device-to-device copy: {copy_gbs:.0f} GB/s; x dtype {args.dtype}; nf4, blocksize 64, double quant",
            ""]
    peer_name = "bnb matmul_4bit" if bnb is not None else "dequant+matmul"
    rows = [f"| N x K | m | quantkit ms | weight GB/s | % of copy BW | cuBLAS fp16 ms | vs cuBLAS | "
            f"{peer_name} ms | vs peer |", "|---|---|---|---|---|---|---|---|---|"]
    for n, k in shapes:
        w = torch.randn(n, k, device=dev, dtype=dtype)
        q = lut4.quantize(w.float().cpu(), "nf4", 64, True)
        t = lambda v: None if v is None else v.to(dev)  # noqa: E731
        wargs = [t(q.packed), t(q.absmax), t(q.quant_map), q.state.blocksize, n, k, None, t(q.nested_quant_map),
                 t(q.nested_absmax), q.state.nested_offset, q.state.nested_blocksize]
        weight_bytes = q.packed.numel() + q.absmax.numel() * q.absmax.element_size() + (
            q.nested_absmax.numel() * 4 if q.nested_absmax is not None else 0)
        wd = lut4.dequantize(q).to(dev, dtype)
        if bnb is not None:
            wb, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        for m in batches:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            ours = _timed(lambda: torch.ops.quantkit.lut4_linear(x, *wargs), reps, flush)
            dense = _timed(lambda: torch.matmul(x, wd.T), reps, flush)
            if bnb is not None:
                peer = _timed(lambda: bnb.matmul_4bit(x, wb.t(), quant_state=state), reps, flush)
            else:
                peer = _timed(lambda: torch.matmul(x, torch.ops.quantkit.lut4_dequantize(
                    *wargs[:6], *wargs[7:]).to(dtype).T), reps, flush)
            gbs = weight_bytes / (ours * 1e-3) / 1e9
            rows.append(f"| {n}x{k} | {m} | {ours:.4f} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | {dense:.4f} | "
                        f"{dense / ours:.2f}x | {peer:.4f} | {peer / ours:.2f}x |")
            print(rows[-1], flush=True)
        del w, wd
    text = "\n".join(head + rows) + "\n"
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
