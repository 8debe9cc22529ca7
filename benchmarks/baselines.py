"""Classical denoisers on CBSD68: what the `baseline` evaluation mode runs, next to what it could run.

    python benchmarks/baselines.py [--data ../shared/data/bench/CBSD68] [--count 12] [--limit N]
                                   [--sigmas 15 25 50] [--no-bm3d] [--out benchmarks/results]
    python benchmarks/baselines.py --tune [nlm lowlight haze]    # the grids behind the rules in tasks/evaluate/baselines.py

Benchmark: the first `--count` (12) CBSD68 images by file name, centre-cropped to a multiple of 16
(481x321 -> 480x320), each degraded by degradations.noise at severity sigma/50 (additive Gaussian,
seed [0, sigma, image index]) and stored as 8-bit, as the evaluation sets are; per sigma
15 / 25 / 50 and per method the mean PSNR / SSIM (tasks.core.metrics, RGB in [0, 1]) and the
seconds per image (wall time, OpenCV's and BM3D's own threading):

    input        the noisy image
    nlm          cv2.fastNlMeansDenoisingColored, h from the ESTIMATED sigma (the baseline mode)
    nlm_true     the same rule from the true sigma (what the estimator costs)
    cbm3d        bm3d.bm3d_rgb(noisy, sigma_psd=sigma/255) (pip install bm3d; the dev extra)

Writes baselines.md to --out, with the machine and the date. `--limit N` uses only the first N
images per sigma (a smoke run; the page says so). Without the data folder it prints why and exits 0.

--tune: on synthetic crops of scikit-image's sample photos (never the benchmark images), the
grid of NLM strengths, of the low-light target / CLAHE clip and of the guided-filter radius that
the docstrings of tasks/evaluate/baselines.py quote.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402

from degradations import haze, lowlight, noise  # noqa: E402
from tasks.core import imageio  # noqa: E402
from tasks.evaluate import baselines  # noqa: E402
from benchmarks._machine import cpu_name  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "bench" / "CBSD68"
SIGMAS = (15, 25, 50)
MULTIPLE = 16
SEED = 0
METHODS = {
    "input": "noisy input",
    "nlm": "OpenCV NLM, h from the estimated sigma (the `baseline` mode)",
    "nlm_true": "OpenCV NLM, h from the true sigma",
    "cbm3d": "CBM3D (`bm3d.bm3d_rgb`, sigma_psd = sigma/255)",
}
TUNE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "stereo_motorcycle")
TUNE_CROP = 256


def metrics(out: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    import torch

    from tasks.core.metrics import image_metrics

    def tensor(img):
        return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]

    values = image_metrics(tensor(out), tensor(target))
    return values["psnr"][0], values["ssim"][0]


def quantize(img: np.ndarray) -> np.ndarray:
    return imageio.to_float_rgb(imageio.to_uint8(img))


def noisy_copy(clean: np.ndarray, sigma: int, index: int) -> np.ndarray:
    degraded, _ = noise.apply(clean, np.random.default_rng([SEED, sigma, index]), sigma / 50.0)
    return quantize(degraded)


# ------------------------------------------------------------------------------------------------
# The benchmark


def load_images(folder: Path, count: int) -> list[tuple[str, np.ndarray]]:
    from tasks.evaluate.sets import centre_crop

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif"))[:count]
    return [(p.name, quantize(centre_crop(imageio.read_image(p), MULTIPLE, str(p)))) for p in files]


def method_functions(use_bm3d: bool) -> dict:
    functions = {
        "input": lambda img, sigma: img,
        "nlm": lambda img, sigma: baselines.nlm_denoise(img),
        "nlm_true": lambda img, sigma: baselines.nlm_denoise(img, sigma=sigma / 255.0),
    }
    if use_bm3d:
        import bm3d

        functions["cbm3d"] = lambda img, sigma: np.clip(bm3d.bm3d_rgb(img, sigma_psd=sigma / 255.0), 0, 1).astype(np.float32)
    return functions


def run_benchmark(images, sigmas, functions) -> dict:
    """{sigma: {method: {"psnr", "ssim", "seconds", "sigma_est"}}} means over the images."""
    results = {}
    for sigma in sigmas:
        rows = {m: {"psnr": [], "ssim": [], "seconds": []} for m in functions}
        estimates = []
        for index, (name, clean) in enumerate(images):
            noisy = noisy_copy(clean, sigma, index)
            estimates.append(baselines.estimate_noise_sigma(noisy) * 255.0)
            for method, fn in functions.items():
                start = time.perf_counter()
                out = fn(noisy, sigma)
                rows[method]["seconds"].append(time.perf_counter() - start)
                p, s = metrics(out, clean)
                rows[method]["psnr"].append(p)
                rows[method]["ssim"].append(s)
            print(f"sigma {sigma} {name}: " + ", ".join(f"{m} {rows[m]['psnr'][-1]:.2f}" for m in functions),
                  flush=True)
        results[sigma] = {m: {k: float(np.mean(v)) for k, v in r.items()} for m, r in rows.items()}
        results[sigma]["_sigma_est"] = float(np.mean(estimates))
    return results


def machine() -> str:
    return (f"{cpu_name()}, {os.cpu_count()} CPUs ({platform.platform()}); Python {platform.python_version()}, "
            f"numpy {np.__version__}, OpenCV {cv2.__version__} ({cv2.getNumThreads()} threads)")


def write_markdown(path: Path, results: dict, images, args, functions, started: float) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        import bm3d  # noqa: F401
        from importlib.metadata import version

        bm3d_version = version("bm3d")
    except Exception:   # noqa: BLE001 - only a label
        bm3d_version = "not installed"
    sizes = sorted({f"{img.shape[1]}x{img.shape[0]}" for _, img in images})
    command = "python benchmarks/baselines.py" + (f" --limit {args.limit}" if args.limit else "") + \
              (" --no-bm3d" if args.no_bm3d else "")
    h_rule = f"h = hColor = {baselines.NLM_H_PER_SIGMA:g} x sigma (8-bit levels)"
    lines = [
        "# Classical denoisers on CBSD68", "",
        f"`{command}` on {machine()}; bm3d {bm3d_version}; {now}, {time.perf_counter() - started:.0f} s in all.", "",
        f"Images: the first {len(images)} CBSD68 images by name ({images[0][0]} ... {images[-1][0]}), centre-cropped "
        f"to a multiple of {MULTIPLE} ({', '.join(sizes)} WxH); additive Gaussian noise "
        f"(degradations.noise, severity sigma/50, seed [{SEED}, sigma, index]) stored as 8-bit. PSNR (dB) / SSIM on RGB "
        "in [0, 1] (tasks.core.metrics), means over the images; seconds of wall time per image.", "",
    ]
    if args.limit:
        lines += [f"**Smoke run (`--limit {args.limit}`): {len(images)} image(s) per sigma; not the benchmark's figures.**", ""]
    lines += [f"NLM: `cv2.fastNlMeansDenoisingColored`, windows {baselines.NLM_TEMPLATE}/{baselines.NLM_SEARCH}, "
              f"{h_rule} (tasks/evaluate/baselines.py `nlm_strength`); `nlm` estimates sigma on the input "
              "(median |Haar HH| / 0.6745), `nlm_true` is given the true one.", ""]
    header = ["Method", *[f"sigma {s}" for s in results], "s/image"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for method in functions:
        cells = [f"{method}: {METHODS[method]}"]
        for sigma in results:
            r = results[sigma][method]
            cells.append(f"{r['psnr']:.2f}/{r['ssim']:.3f}")
        seconds = statistics.mean(results[s][method]["seconds"] for s in results)
        cells.append("-" if method == "input" else f"{seconds:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Estimated sigma (mean over the images, 8-bit levels): "
              + ", ".join(f"true {s}: {results[s]['_sigma_est']:.1f}" for s in results) + ".", "",
              "Seconds per image by sigma: " + "; ".join(
                  f"{m} " + "/".join(f"{results[s][m]['seconds']:.3f}" for s in results) for m in functions if m != "input")
              + ".", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------
# --tune


def tune_crops() -> list[np.ndarray]:
    import skimage.data

    crops = []
    for name in TUNE_PHOTOS:
        rgb = getattr(skimage.data, name)()
        rgb = rgb[0] if isinstance(rgb, tuple) else rgb
        y0, x0 = (rgb.shape[0] - TUNE_CROP) // 2, (rgb.shape[1] - TUNE_CROP) // 2
        crops.append(imageio.to_float_rgb(np.ascontiguousarray(rgb[y0:y0 + TUNE_CROP, x0:x0 + TUNE_CROP, :3])))
    return crops


TUNE_PARTS = ("nlm", "lowlight", "haze")


def tune(parts=TUNE_PARTS) -> None:
    crops = tune_crops()
    print(f"crops: centre {TUNE_CROP}x{TUNE_CROP} of {', '.join(TUNE_PHOTOS)}; "
          f"mean luminance {', '.join(f'{baselines.mean_luminance(c):.3f}' for c in crops)}")
    if "nlm" in parts:
        tune_nlm(crops)
    if "lowlight" in parts:
        tune_lowlight(crops)
    if "haze" in parts:
        tune_haze(crops)


def tune_nlm(crops) -> None:

    # NLM: h = k * sigma_est, hColor = kc * sigma_est.
    ks = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)
    ratios = (0.75, 1.0, 1.25)            # kc = ratio * k
    noisy = {s: [noisy_copy(c, s, i) for i, c in enumerate(crops)] for s in SIGMAS}
    est = {s: [baselines.estimate_noise_sigma(n) * 255.0 for n in noisy[s]] for s in SIGMAS}
    print("\nestimated sigma (8-bit): " + "; ".join(
        f"true {s}: " + ", ".join(f"{e:.1f}" for e in est[s]) + f" (mean {np.mean(est[s]):.1f})" for s in SIGMAS))
    print("\nNLM mean PSNR, h = k * sigma_est, hColor = kc * sigma_est")
    print("k     kc/k  " + "  ".join(f"s{s:<6}" for s in SIGMAS) + "  mean")
    for source, sig in (("estimated", est), ("true", {s: [float(s)] * len(crops) for s in SIGMAS})):
        print(f"-- sigma {source}")
        for k in ks:
            for ratio in ratios:
                means = []
                for s in SIGMAS:
                    values = []
                    for n, c, e in zip(noisy[s], crops, sig[s]):
                        out = cv2.fastNlMeansDenoisingColored(imageio.to_uint8(n), None, k * e, ratio * k * e,
                                                              baselines.NLM_TEMPLATE, baselines.NLM_SEARCH)
                        values.append(metrics(imageio.to_float_rgb(out), c)[0])
                    means.append(float(np.mean(values)))
                print(f"{k:<5} {ratio:<5} " + "  ".join(f"{m:7.2f}" for m in means) + f"  {np.mean(means):.2f}")
    print("noisy       " + "  ".join(f"{np.mean([metrics(n, c)[0] for n, c in zip(noisy[s], crops)]):7.2f}"
                                      for s in SIGMAS))



def tune_lowlight(crops) -> None:
    """Low light at the evaluation sets' severity 0.6: target x CLAHE clip (None: gamma alone)."""
    clips = (None, 0.5, 1.0, 1.5, 2.0)
    dark = [quantize(lowlight.apply(c, np.random.default_rng([SEED, i]), 0.6)[0]) for i, c in enumerate(crops)]
    print(f"\nlow light 0.6: darkened {np.mean([metrics(d, c)[0] for d, c in zip(dark, crops)]):.2f} dB")
    print("target  " + "  ".join(f"clip {c or 'none':<4}" for c in clips))
    for target in (0.30, 0.35, 0.40, 0.45, 0.50):
        row = [np.mean([metrics(baselines.gamma_clahe(d, target, clip), c)[0] for d, c in zip(dark, crops)])
               for clip in clips]
        print(f"{target:.2f}    " + "  ".join(f"{v:9.2f}" for v in row))


def tune_haze(crops) -> None:
    """Haze at the evaluation sets' severity 0.6: the guided filter's radius x eps."""
    radii, epsilons = (2, 4, 6, 8, 12, 32, 60), (1e-4, 1e-3, 1e-2)
    hazy = [quantize(haze.apply(c, np.random.default_rng([SEED, i]), 0.6)[0]) for i, c in enumerate(crops)]
    print(f"\nhaze 0.6: hazy {np.mean([metrics(h, c)[0] for h, c in zip(hazy, crops)]):.2f} dB")
    print("eps     " + "  ".join(f"r {r:<5}" for r in radii))
    for eps in epsilons:
        row = [np.mean([metrics(baselines.dark_channel_dehaze(h, r, eps), c)[0] for h, c in zip(hazy, crops)])
               for r in radii]
        print(f"{eps:<7g} " + "  ".join(f"{v:7.2f}" for v in row))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the CBSD68 folder (clean images)")
    parser.add_argument("--count", type=int, default=12, help="images: the first COUNT by name")
    parser.add_argument("--limit", type=int, default=None, help="only the first N of them per sigma (a smoke run)")
    parser.add_argument("--sigmas", type=int, nargs="+", default=list(SIGMAS))
    parser.add_argument("--no-bm3d", action="store_true", help="leave CBM3D out (it takes most of the time)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tune", nargs="*", choices=TUNE_PARTS, default=None,
                        help="print the grids behind the baseline rules (all, or the parts named) and exit")
    args = parser.parse_args(argv)
    if args.tune is not None:
        tune(args.tune or TUNE_PARTS)
        return 0
    folder = Path(args.data)
    if not folder.is_dir():
        print(f"benchmarks/baselines.py: skipped: {folder} not found (the CBSD68 benchmark images; see "
              "profiles/bench.yaml)")
        return 0
    use_bm3d = not args.no_bm3d
    if use_bm3d:
        try:
            import bm3d  # noqa: F401
        except ImportError:
            print("benchmarks/baselines.py: bm3d is not installed (pip install -e '.[dev]'): CBM3D left out")
            use_bm3d = False
    started = time.perf_counter()
    images = load_images(folder, args.count)
    if not images:
        print(f"benchmarks/baselines.py: skipped: no images in {folder}")
        return 0
    if args.limit:
        images = images[:args.limit]
    functions = method_functions(use_bm3d)
    results = run_benchmark(images, args.sigmas, functions)
    out = Path(args.out) / "baselines.md"
    write_markdown(out, results, images, args, functions, started)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
