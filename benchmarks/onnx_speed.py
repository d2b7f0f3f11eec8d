"""Merged ViTs in ONNX Runtime on CPU: fp32 and dynamic INT8, dense vs merged at matched FLOPs, interleaved.

    python -m benchmarks.onnx_speed --reference ../shared/reference/dinov2_s14_fmnist.json

Per model (random-init ``vit_small_patch16_224`` and ``vit_base_patch16_224``: speed does not depend on the
weights), three graphs are exported with :func:`dsm_lightning.export.export_onnx` (dynamic batch): dense, the
default ``DSMConfig()`` (1.8x fewer FLOPs) and official ToMe (``DSMConfig.tome(r)``, the largest ``r`` spending at
least the default's FLOPs), each also quantized with ONNX Runtime's ``quantize_dynamic`` (INT8 weights, dynamic
activations) after ORT's ``quant_pre_process``. All six sessions (2 intra-op threads, ORT's default optimization
level) run interleaved in one process at batch 1 and 16 after warm-up; the table gives medians and ratios against
dense fp32 from the same run, the export time, and which fused operators ONNX Runtime's optimizer produced in each
graph.

With ``--reference``, the reference classifier (its side-car JSON) is exported dense and merged, fp32 and INT8, and
run on the held-out ``eval`` pool of ``benchmarks/fmnist_pool.py``: top-1 agreement with dense fp32 and its paired
standard error. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from benchmarks.common import environment
from benchmarks.matched_tome import bracket
from benchmarks.pareto import load, paired_se
from dsm_lightning import DSMConfig, apply_dsm, remove_dsm
from dsm_lightning.export import export_onnx
from dsm_lightning.flops import count_flops

#: Operator types that show ONNX Runtime fused something (attention, layer norm, GELU, quantized matmuls).
FUSED = (
    "Attention",
    "MultiHeadAttention",
    "FusedMatMul",
    "LayerNormalization",
    "SkipLayerNormalization",
    "Gelu",
    "BiasGelu",
    "FastGelu",
    "QuickGelu",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "FusedConv",
)


def session(path: Path, threads: int, optimized: Optional[Path] = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def fused_ops(path: Path) -> Dict[str, int]:
    import onnx

    counts = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return {k: counts[k] for k in FUSED if counts[k]}


def export_variants(model, configs: Dict[str, Any], folder: Path, size: int) -> Dict[str, Dict[str, Any]]:
    """fp32 and INT8 files for each config (None = dense), with export times and GFLOPs."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out: Dict[str, Dict[str, Any]] = {}
    x = torch.randn(1, 3, size, size)
    for name, config in configs.items():
        remove_dsm(model)
        if config is not None:
            apply_dsm(model, config)
        gflops = count_flops(model, x) / 1e9
        start = time.perf_counter()
        fp32 = export_onnx(model, folder / f"{name}.onnx", size, overwrite=True)
        seconds = time.perf_counter() - start
        int8, pre = folder / f"{name}.int8.onnx", folder / f"{name}.pre.onnx"
        # ORT's pre-processing folds the exporter's Transpose(weight) nodes into initializers; without it
        # quantize_dynamic finds no constant matmul weight and quantizes almost nothing
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(str(pre), str(int8), weight_type=QuantType.QInt8)
        out[name] = {"fp32": fp32, "int8": int8, "export_s": seconds, "gflops": gflops}
        out[name]["config"] = None if config is None else config.to_dict()
    remove_dsm(model)
    return out


def time_sessions(files: Dict[str, Path], batch: int, size: int, reps: int, threads: int) -> Dict[str, float]:
    """Median seconds per batch of each file, runs interleaved (one round runs every file once)."""
    sessions = {k: session(p, threads) for k, p in files.items()}
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    for s in sessions.values():  # warm-up: allocations, thread pools
        for _ in range(2):
            s.run(None, {"pixels": x})
    times: Dict[str, List[float]] = {k: [] for k in sessions}
    for _ in range(reps):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"pixels": x})
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def agreement(files: Dict[str, Path], images: torch.Tensor, threads: int, batch: int = 16) -> Dict[str, Any]:
    """Top-1 of each file on ``images`` and agreement with ``dense.fp32`` (mean, paired SE)."""
    preds = {}
    for k, p in files.items():
        s = session(p, threads)
        out = [s.run(None, {"pixels": images[i : i + batch].numpy()})[0] for i in range(0, len(images), batch)]
        preds[k] = torch.from_numpy(np.concatenate(out)).argmax(-1)
    ref = preds["dense.fp32"]
    res = {}
    for k, p in preds.items():
        hit = (p == ref).float()
        res[k] = {"agreement": float(hit.mean()), "se": paired_se(hit - 1.0) if k != "dense.fp32" else 0.0}
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference", help="side-car JSON of the reference classifier (agreement on held-out data)")
    parser.add_argument("--pool-size", type=int, default=300)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--idx-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "onnx_speed_cpu")
    args = parser.parse_args(argv)
    import timm

    torch.manual_seed(0)
    rows: List[Dict[str, Any]] = []
    fusion: Dict[str, Dict[str, int]] = {}
    exports: Dict[str, Dict[str, float]] = {}
    work = Path(tempfile.mkdtemp(prefix="dsm-onnx-"))
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval()
        size = model.patch_embed.img_size[0]
        default = DSMConfig()
        apply_dsm(model, default)
        target = count_flops(model, torch.randn(1, 3, size, size)) / 1e9
        remove_dsm(model)
        r_lo = bracket(model, torch.randn(3, size, size), target)["r_lo"]
        folder = work / name
        folder.mkdir()
        variants = export_variants(
            model, {"dense": None, "default": default, f"tome-r{r_lo}": DSMConfig.tome(r_lo)}, folder, size
        )
        exports[name] = {k: v["export_s"] for k, v in variants.items()}
        files = {f"{k}.{kind}": v[kind] for k, v in variants.items() for kind in ("fp32", "int8")}
        for k, p in files.items():
            opt = folder / f"{k}.optimized.onnx"
            session(p, args.threads, opt)
            fusion[f"{name}/{k}"] = fused_ops(opt)
        for batch in args.batches:
            med = time_sessions(files, batch, size, args.reps, args.threads)
            base = med["dense.fp32"]
            for k, m in med.items():
                variant = k.split(".")[0]
                rows.append(
                    {
                        "model": name,
                        "batch": batch,
                        "variant": k,
                        "gflops": variants[variant]["gflops"],
                        "flops_reduction": variants["dense"]["gflops"] / variants[variant]["gflops"],
                        "median_ms": 1000 * m,
                        "speedup_vs_dense_fp32": base / m,
                    }
                )
                print(rows[-1], flush=True)
    quality = None
    if args.reference:
        from benchmarks.fmnist_pool import load_pool

        module, transform = load(args)
        images, _, _ = load_pool("eval", args.pool_size, transform, args.shared, args.idx_dir)
        size = images.shape[-1]
        folder = work / "reference"
        folder.mkdir()
        variants = export_variants(module.model, {"dense": None, "default": DSMConfig()}, folder, size)
        files = {f"{k}.{kind}": v[kind] for k, v in variants.items() for kind in ("fp32", "int8")}
        quality = agreement(files, images, args.threads)
        print(quality, flush=True)
    meta = {"env": environment("cpu"), "threads": args.threads, "reps": args.reps, "export_seconds": exports}
    meta["fused_ops"] = fusion
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows, "agreement": quality}, indent=1, default=str)
    )
    lines = [
        f"ONNX Runtime CPU, {args.threads} threads, median of {args.reps} interleaved runs after warm-up; speedup "
        f"against dense fp32 of the same model and batch in the same run.",
        "",
        "| model | batch | variant | GFLOPs | FLOP reduction | median ms | speedup vs dense fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['variant']} | {r['gflops']:.2f} | {r['flops_reduction']:.2f}x | "
            f"{r['median_ms']:.1f} | {r['speedup_vs_dense_fp32']:.2f}x |"
        )
    lines += [
        "",
        "Export time (s, `export_onnx`, dynamic batch): "
        + "; ".join(f"{m}: " + ", ".join(f"{k} {v:.0f}" for k, v in e.items()) for m, e in exports.items()),
    ]
    lines += ["", "Fused operators in ONNX Runtime's optimized graphs:", ""]
    lines += [f"- {k}: {v}" for k, v in fusion.items()]
    if quality is not None:
        lines += ["", f"Top-1 agreement with dense fp32 on {args.pool_size} held-out images (reference model):", ""]
        lines += [f"- {k}: {100 * v['agreement']:.1f}% (paired SE {100 * v['se']:.1f})" for k, v in quality.items()]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
