"""Model size and speed: parameters per size, CPU latency, and (with a CUDA device) GPU training
throughput, peak memory and inference latency.

    python benchmarks/model_speed.py [--out benchmarks/results] [--sizes tiny base large] [--compile]

Writes <out>/model_speed.json and <out>/model_speed.md. The GPU part runs only when
torch.cuda.is_available(); the report says so when it did not.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.adapters import AdapterBank  # noqa: E402
from models.backbone import SIZES, build_backbone  # noqa: E402
from models.estimator import Estimator  # noqa: E402
from models.restorer import Restorer, param_counts  # noqa: E402
from benchmarks._machine import cpu_name  # noqa: E402

DEGRADATIONS = ["rain", "haze", "noise", "blur", "lowlight"]


def with_adapters(model, kind: str):
    """Five adapters with non-zero weights (as if trained) and soft weights over all of them."""
    bank = AdapterBank(model, kind=kind, rank=4, alpha=4.0)
    for name in DEGRADATIONS:
        bank.add(name)
        with torch.no_grad():
            for p in bank.parameters_of(name):
                p.add_(torch.randn_like(p) * 0.02)
    return bank


def soft_weights(batch: int) -> torch.Tensor:
    return torch.softmax(torch.randn(batch, len(DEGRADATIONS)), dim=1)


# ------------------------------------------------------------------------------------------------
# CPU


def time_cpu_interleaved(fns: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Median CPU time (ms) and wall time (ms) of each function, one call of each per round.

    Runs on one thread and reads the thread's CPU clock: time slices lost to other processes on
    a shared machine do not count, so the figures stay comparable when the machine is busy.
    Interleaving the variants spreads any remaining drift (caches, memory bandwidth) evenly.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for fn in fns.values():
            fn()  # warm-up: allocator, oneDNN primitive caches
        cpu: dict[str, list[float]] = {name: [] for name in fns}
        wall: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                start_wall, start_cpu = time.perf_counter(), time.thread_time()
                fn()
                cpu[name].append(time.thread_time() - start_cpu)
                wall[name].append(time.perf_counter() - start_wall)
    finally:
        torch.set_num_threads(threads)
    return {name: {"cpu_ms": statistics.median(cpu[name]) * 1e3, "wall_ms": statistics.median(wall[name]) * 1e3}
            for name in fns}


def cpu_part(sizes: list[str], side: int, repeats: dict[str, int]) -> dict:
    """Batch 1: backbone; + 5 LoRA on the per-sample path; + 5 LoRA through Restorer.restore
    (which merges the shared blend: merge + forward + unmerge); + 5 AdaptIR."""
    results = {}
    x = torch.rand(1, 3, side, side)
    weights = soft_weights(1)
    for size in sizes:
        models, banks = {}, {}
        for variant in ("plain", "lora", "adaptir"):
            torch.manual_seed(0)
            models[variant] = build_backbone(size).eval()
            banks[variant] = None if variant == "plain" else with_adapters(models[variant], variant)
        restorer = Restorer(models["lora"], banks["lora"])

        def forward(variant):
            def run():
                with torch.no_grad(), banks[variant].weights(weights) if banks[variant] else contextlib.nullcontext():
                    models[variant](x)
            return run

        fns = {"plain": forward("plain"), "lora": forward("lora"),
               "lora_merged": lambda: restorer.restore(x, mode="sw", weights=weights),
               "adaptir": forward("adaptir")}
        timings = time_cpu_interleaved(fns, repeats.get(size, 3))
        row = {name: {key: round(v, 1) for key, v in t.items()} for name, t in timings.items()}
        for variant in ("lora", "adaptir"):
            row[variant]["adapter_parameters"] = banks[variant].num_parameters()
        row["plain"]["backbone_parameters"] = param_counts(models["plain"])["backbone"]
        for name, t in row.items():
            print(f"cpu {size:6s} {name:12s} cpu {t['cpu_ms']:9.1f} ms  wall {t['wall_ms']:9.1f} ms", flush=True)
        results[size] = row
        del models, banks, restorer
    return results


def parameter_part(sizes: list[str]) -> dict:
    out = {}
    for size in sizes:
        model = build_backbone(size, seg_classes=len(DEGRADATIONS))
        counts = {"backbone": param_counts(model)["backbone"], "seg_head": param_counts(model)["seg_head"]}
        for kind in ("lora", "adaptir"):
            bank = AdapterBank(build_backbone(size), kind=kind, rank=4, alpha=4.0)
            for name in DEGRADATIONS:
                bank.add(name)
            counts[f"{kind}_per_adapter"] = bank.num_parameters(DEGRADATIONS[0])
            counts[f"{kind}_five_adapters"] = bank.num_parameters()
        counts["prompt_backbone"] = param_counts(build_backbone(size, prompt=True))["backbone"]
        out[size] = counts
    out["estimator"] = param_counts(estimator=Estimator(len(DEGRADATIONS)))["estimator"]
    return out


# ------------------------------------------------------------------------------------------------
# GPU


def cuda_time(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_train(size: str, batch: int, patch: int, compile_model: bool, steps: int) -> dict:
    """Phase I step: L1 restoration + multi-label segmentation loss, AdamW (fused), bf16 autocast,
    channels-last, TF32."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_backbone(size, seg_classes=len(DEGRADATIONS)).to(device).to(memory_format=torch.channels_last)
    model.train()
    step_model = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4, fused=True)
    degraded = torch.rand(batch, 3, patch, patch, device=device).to(memory_format=torch.channels_last)
    clean = torch.rand_like(degraded)
    masks = (torch.rand(batch, len(DEGRADATIONS), patch, patch, device=device) > 0.5).float()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            restored, seg = step_model(degraded, with_seg=True)
            loss = F.l1_loss(restored.float(), clean) + 0.1 * F.binary_cross_entropy_with_logits(seg.float(), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    torch.cuda.reset_peak_memory_stats()
    ms = cuda_time(step, warmup=5 if compile_model else 3, repeats=steps)
    return {"size": size, "batch": batch, "patch": patch, "compile": compile_model, "step_ms": round(ms, 2),
            "images_per_s": round(batch / ms * 1e3, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}


def gpu_infer(size: str, side: int, kind: str | None, compile_model: bool, repeats: int) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_backbone(size).to(device).eval()
    bank = with_adapters(model, kind) if kind else None
    model.to(memory_format=torch.channels_last)
    run_model = torch.compile(model) if compile_model else model
    x = torch.rand(1, 3, side, side, device=device).to(memory_format=torch.channels_last)
    weights = soft_weights(1) if bank is not None else None

    def run():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            if bank is None:
                run_model(x)
            else:
                with bank.weights(weights):
                    run_model(x)

    torch.cuda.reset_peak_memory_stats()
    ms = cuda_time(run, warmup=5, repeats=repeats)
    return {"size": size, "side": side, "adapters": f"5 {kind} (sw)" if kind else "none", "compile": compile_model,
            "ms": round(ms, 2), "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}


def gpu_part(compile_model: bool) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    out = {"device": torch.cuda.get_device_name(0), "train": [], "inference": []}
    for compiled in sorted({False, compile_model}):
        out["train"].append(gpu_train("base", 16, 128, compiled, steps=20))
        print("gpu train", out["train"][-1], flush=True)
        torch.cuda.empty_cache()
    for side in (512, 1024):
        for kind in (None, "lora", "adaptir"):
            out["inference"].append(gpu_infer("base", side, kind, compile_model, repeats=10))
            print("gpu infer", out["inference"][-1], flush=True)
            torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------
# Report


def write_report(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = ["# Model size and speed", "",
             f"Command: `{result['command']}`  ",
             f"Date: {result['date']}  ",
             f"Machine: {m['cpu']} ({m['cores']} cores visible, {m['torch_threads']} torch threads), "
             f"GPU: {m['gpu'] or 'none'}, torch {m['torch']}, Python {m['python']}  ",
             f"Load average (1/5/15 min) at start {m['load_average_at_start']}, at end "
             f"{m['load_average_at_end']}: CPU times are only as clean as the machine was quiet.", "",
             "## Parameters", "",
             "| size | backbone | seg head (5 classes) | backbone with prompts | LoRA r4: one / five | AdaptIR: one / five |",
             "|---|---:|---:|---:|---:|---:|"]
    for size, c in result["parameters"].items():
        if size == "estimator":
            continue
        lines.append(f"| {size} | {c['backbone']:,} | {c['seg_head']:,} | {c['prompt_backbone']:,} | "
                     f"{c['lora_per_adapter']:,} / {c['lora_five_adapters']:,} | "
                     f"{c['adaptir_per_adapter']:,} / {c['adaptir_five_adapters']:,} |")
    lines += ["", f"Estimator: {result['parameters']['estimator']:,} parameters. LoRA targets: attn.qkv, "
              "attn.project_out, ffn.project_in, ffn.project_out of every transformer block (rank 4, alpha 4); "
              "AdaptIR: hidden 8, rank 4, beside every FFN. The paper reports about 3.6M for five LoRA adapters.", ""]

    if result.get("cpu"):
        side = result["cpu_side"]
        lines += [f"## CPU forward, batch 1, {side}x{side}, eval, no_grad: median CPU ms on one thread", "",
                  "| size | backbone | + 5 LoRA, per-sample path | + 5 LoRA, merged by Restorer | + 5 AdaptIR |",
                  "|---|---:|---:|---:|---:|"]
        for size, row in result["cpu"].items():
            lines.append(f"| {size} | {row['plain']['cpu_ms']:.1f} | {row['lora']['cpu_ms']:.1f} | "
                         f"{row['lora_merged']['cpu_ms']:.1f} | {row['adaptir']['cpu_ms']:.1f} |")
        lines += ["", "CPU time of the one torch thread (time.thread_time), so time slices taken by other "
                  "processes on a shared machine do not count; wall-clock medians are in the JSON. Soft weights "
                  "over five adapters with non-zero (random) tensors. The per-sample path is what training and "
                  "mixed batches use; Restorer.restore merges a blend shared by the batch (always for one image) "
                  "into the backbone, so it costs the backbone's time plus the merge (and the clamp). Variants "
                  "are timed in interleaved rounds.", ""]

    lines += ["## GPU", ""]
    gpu = result.get("gpu")
    if not gpu:
        lines += ["Not run: no CUDA device on this machine. On a GPU machine the same command measures "
                  "Phase I training of `base` (batch 16, 128x128, AdamW fused, bf16 autocast, channels-last, "
                  "TF32; `--compile` adds torch.compile), peak memory, and 512/1024 inference latency with and "
                  "without adapters. Targets: >= 150 img/s training, < 90 ms at 1024x1024 on an H100.", ""]
    else:
        lines += [f"Device: {gpu['device']}", "",
                  "| training | compile | step ms | images/s | peak GiB |", "|---|---|---:|---:|---:|"]
        for r in gpu["train"]:
            lines.append(f"| {r['size']} b{r['batch']} {r['patch']}px | {r['compile']} | {r['step_ms']} | "
                         f"{r['images_per_s']} | {r['peak_memory_gib']} |")
        lines += ["", "| inference (bf16) | adapters | compile | ms | peak GiB |", "|---|---|---|---:|---:|"]
        for r in gpu["inference"]:
            lines.append(f"| {r['size']} {r['side']}x{r['side']} | {r['adapters']} | {r['compile']} | {r['ms']} | "
                         f"{r['peak_memory_gib']} |")
        lines.append("")
    (out_dir / "model_speed.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--side", type=int, default=256, help="CPU input side")
    parser.add_argument("--repeats", type=int, default=5, help="CPU repeats for tiny (base, large: 3)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile on the GPU")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args(argv)

    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "python": platform.python_version()},
        "parameters": parameter_part(args.sizes),
        "cpu_side": args.side,
    }
    if not args.skip_cpu:
        result["cpu"] = cpu_part(args.sizes, args.side, {"tiny": args.repeats, "base": 3, "large": 3})
    result["gpu"] = gpu_part(args.compile) if torch.cuda.is_available() else None
    result["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    write_report(result, Path(args.out))
    print(f"wrote {Path(args.out) / 'model_speed.md'}")
    return result


if __name__ == "__main__":
    main()
