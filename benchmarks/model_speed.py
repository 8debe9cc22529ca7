"""Model size and speed: parameters per size, CPU latency, the pixel-wise mode's cost, and (with a
CUDA device) GPU training throughput, peak memory and inference latency.

    python benchmarks/model_speed.py [--out benchmarks/results] [--sizes tiny base large] [--compile]
    python benchmarks/model_speed.py --pw-only          # only the pixel-wise part, into the existing results

Writes <out>/model_speed.json and <out>/model_speed.md. The GPU part runs only when
torch.cuda.is_available(); the report says so when it did not. The pixel-wise part (mode pw, issue
14) times the served modes of one system at --pw-side (512) on CPU: sw merged, the per-sample LoRA
path, pw with the estimator's dense head and pw with the segmentation head's extra backbone pass;
--pw-only measures it alone and keeps the other parts' figures (each part records its machine).
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
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.adapters import AdapterBank  # noqa: E402
from models.backbone import SIZES, build_backbone  # noqa: E402
from models.estimator import Estimator  # noqa: E402
from models.restorer import Restorer, param_counts  # noqa: E402
from benchmarks._machine import cpu_name  # noqa: E402

DEGRADATIONS = ["rain", "haze", "noise", "blur", "lowlight"]
PW_TARGET = 1.6   # issue 14: pw with the dense map at most this many times merged sw, 512x512 on CPU


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


def served_estimator() -> Estimator:
    """The default profile's estimator (params.yaml `estimator`: width, crops, view, do-no-harm and
    the dense head), untrained: its cost does not depend on its values."""
    cfg = yaml.safe_load((ROOT / "params.yaml").read_text())["estimator"]
    return Estimator(len(DEGRADATIONS), width=cfg["width"], crops=cfg["crops"], crop_size=cfg["crop_size"],
                     view_size=cfg["view_size"], do_no_harm=bool(cfg.get("do_no_harm", False)), dense=True,
                     class_names=DEGRADATIONS).eval()


def pw_system(size: str) -> tuple[Restorer, AdapterBank]:
    """A served system as the default pipeline leaves it: the backbone with its Phase I
    segmentation head (five classes, named), five LoRA adapters, the default estimator with a
    dense head."""
    torch.manual_seed(0)
    backbone = build_backbone(size, seg_classes=len(DEGRADATIONS)).eval()
    # what models.identity.load_backbone sets from a checkpoint's `classes`
    backbone.seg_class_names = list(DEGRADATIONS)
    bank = with_adapters(backbone, "lora")
    return Restorer(backbone, bank, served_estimator()).eval(), bank


def pw_part(sizes: list[str], side: int, repeats: int) -> dict:
    """Batch 1 at side x side, one thread, interleaved rounds: what each served mode costs.

    per_sample: the network with soft weights on the per-sample LoRA path (no estimator);
    sw_merged: Restorer.restore with the weights given (merged: the backbone's cost);
    sw: Restorer.restore(mode="sw"): the estimator, the merged blend, the keep head;
    pw_map: mode pw with a constant map given (the per-pixel LoRA path alone, no estimator);
    pw_dense: mode pw from the estimator's dense head (the map, the per-pixel path, the keep head);
    pw_seg: mode pw from the segmentation head (one more backbone pass without adapters first)."""
    results = {}
    x = torch.rand(1, 3, side, side)
    weights = soft_weights(1)
    for size in sizes:
        restorer, bank = pw_system(size)
        constant_map = torch.cat([weights, torch.zeros(1, 1)], dim=1)[:, :, None, None].expand(-1, -1, 8, 8)

        def per_sample():
            with torch.no_grad(), bank.weights(weights):
                restorer.backbone(x)

        fns = {"per_sample": per_sample,
               "sw_merged": lambda: restorer.restore(x, mode="sw", weights=weights),
               "sw": lambda: restorer.restore(x, mode="sw"),
               "pw_map": lambda: restorer.restore(x, mode="pw", weights=constant_map),
               "pw_dense": lambda: restorer.restore(x, mode="pw", pw_source="dense"),
               "pw_seg": lambda: restorer.restore(x, mode="pw", pw_source="seg")}
        timings = time_cpu_interleaved(fns, repeats)
        row = {name: {key: round(v, 1) for key, v in t.items()} for name, t in timings.items()}
        for name, t in row.items():
            print(f"pw  {size:6s} {name:12s} cpu {t['cpu_ms']:9.1f} ms  wall {t['wall_ms']:9.1f} ms", flush=True)
        results[size] = row
        del restorer, bank
    return results


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version()}


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
    notes = result.get("notes", {})
    estimator_note = notes.get("estimator", "")
    lines += ["", f"Estimator: {result['parameters']['estimator']:,} parameters{estimator_note}. LoRA targets: attn.qkv, "
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
        if notes.get("after_cpu"):
            lines += [notes["after_cpu"], ""]

    if result.get("pw"):
        lines += pw_report(result["pw"], result.get("pw_earlier", []))

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


def pw_report(pw: dict, earlier: list[dict]) -> list[str]:
    """The pixel-wise section: median CPU ms per served mode and the ratios the issue asks for;
    one line per earlier run (the code may have changed in between: see its date)."""
    m = pw["machine"]
    side = pw["side"]
    lines = [f"## Pixel-wise mode (pw): CPU, batch 1, {side}x{side}, one thread, median CPU ms", "",
             f"Command: `{pw['command']}`, {pw['date']}, {m['cpu']} ({m['cores']} cores visible), torch {m['torch']}; "
             f"load average at start {m['load_average_at_start']}, at end {m['load_average_at_end']}.", "",
             "| size | per-sample LoRA | sw merged (weights given) | sw (served) | pw, map given | pw dense | pw seg | "
             "pw dense / sw merged | pw dense / sw | pw dense / per-sample | pw seg / sw | pw seg / per-sample |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size, row in pw["cpu"].items():
        ms = {name: t["cpu_ms"] for name, t in row.items()}
        ratio = lambda a, b: f"{ms[a] / ms[b]:.2f}x"  # noqa: E731
        lines.append(f"| {size} | {ms['per_sample']:.1f} | {ms['sw_merged']:.1f} | {ms['sw']:.1f} | {ms['pw_map']:.1f} | "
                     f"{ms['pw_dense']:.1f} | {ms['pw_seg']:.1f} | {ratio('pw_dense', 'sw_merged')} | "
                     f"{ratio('pw_dense', 'sw')} | {ratio('pw_dense', 'per_sample')} | {ratio('pw_seg', 'sw')} | "
                     f"{ratio('pw_seg', 'per_sample')} |")
    lines += ["", "One system as the default pipeline serves it: the backbone with its segmentation head (5 classes), "
              "five LoRA adapters (rank 4, random non-zero tensors), the default profile's estimator (params.yaml) with "
              "its dense head, untrained. *per-sample LoRA*: the network with soft weights on the per-sample path, no "
              "estimator; *sw merged*: Restorer.restore with the weights given (the blend merged into the backbone); "
              "*sw (served)*: mode sw as `abair restore` runs it (the estimator, the merged blend, the keep head); "
              "*pw, map given*: a constant map given, so the per-pixel LoRA path alone; *pw dense*: the estimator's "
              "dense head makes the map, then the per-pixel path and the keep head; *pw seg*: the segmentation head's "
              "map, which costs one more backbone pass (without adapters) before the adapted one.", ""]
    for size, row in pw["cpu"].items():
        ratio = row["pw_dense"]["cpu_ms"] / row["sw_merged"]["cpu_ms"]
        verdict = "within" if ratio <= PW_TARGET else "over"
        lines += [f"{size}: pw dense costs {ratio:.2f}x merged sw, {verdict} the issue's target of {PW_TARGET}x; the "
                  f"per-pixel path alone (map given) {row['pw_map']['cpu_ms'] / row['sw_merged']['cpu_ms']:.2f}x, the "
                  f"per-sample path {row['per_sample']['cpu_ms'] / row['sw_merged']['cpu_ms']:.2f}x.", ""]
    for run in earlier:
        for size, row in run["cpu"].items():
            ms = {name: t["cpu_ms"] for name, t in row.items()}
            lines += [f"Earlier run, `{run['command']}` at {run['date']} ({size}, {run['side']} px): sw merged "
                      f"{ms['sw_merged']:.1f} ms, per-sample {ms['per_sample']:.1f}, pw map given {ms['pw_map']:.1f}, "
                      f"pw dense {ms['pw_dense']:.1f} ({ms['pw_dense'] / ms['sw_merged']:.2f}x merged sw), pw seg "
                      f"{ms['pw_seg']:.1f}.", ""]
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--side", type=int, default=256, help="CPU input side")
    parser.add_argument("--repeats", type=int, default=5, help="CPU repeats for tiny (base, large: 3)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile on the GPU")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--pw-side", type=int, default=512, help="input side of the pixel-wise part")
    parser.add_argument("--pw-sizes", nargs="+", default=["tiny"], choices=list(SIZES),
                        help="sizes of the pixel-wise part (default: tiny; base takes about a minute a call on CPU)")
    parser.add_argument("--pw-repeats", type=int, default=3)
    parser.add_argument("--pw-only", action="store_true",
                        help="measure only the pixel-wise part; the other parts' figures stay as the JSON has them")
    args = parser.parse_args(argv)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    out = Path(args.out)

    if args.pw_only:
        previous = out / "model_speed.json"
        if not previous.is_file():
            raise SystemExit(f"{previous}: not found; --pw-only adds to an earlier full run")
        result = json.loads(previous.read_text())
    else:
        result = {"command": command, "date": date, "machine": machine(), "parameters": parameter_part(args.sizes),
                  "cpu_side": args.side}
        if not args.skip_cpu:
            result["cpu"] = cpu_part(args.sizes, args.side, {"tiny": args.repeats, "base": 3, "large": 3})
        result["gpu"] = gpu_part(args.compile) if torch.cuda.is_available() else None
        result["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    if args.pw_only or not args.skip_cpu:
        if result.get("pw"):   # earlier runs stay in the report: CPU figures on a shared machine move between runs
            result["pw_earlier"] = [*result.get("pw_earlier", []), result["pw"]]
        pw = {"command": command, "date": date, "machine": machine(), "side": args.pw_side}
        pw["cpu"] = pw_part(args.pw_sizes, args.pw_side, args.pw_repeats)
        pw["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
        result["pw"] = pw
    write_report(result, out)
    print(f"wrote {out / 'model_speed.md'}")
    return result


if __name__ == "__main__":
    main()
