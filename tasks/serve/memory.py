"""How much memory restoring one image takes, and the tiling that fits a budget.

`abair restore --memory-budget` (default 2 GiB) and `--tiling auto` (the default) pick, per image:

    exact   tiles inside the network (the same pixels as whole-image inference), when it fits:
            the blocks' wide maps exist for one tile at a time, but every level's input, output
            and skip connection is whole, so memory grows with the image (EXACT_FLOATS per pixel
            and per unit of backbone width);
    local   independent overlapping tiles (models/tiling.py), when exact does not fit: memory is
            the whole image's arrays (IMAGE_BYTES per pixel) plus one tile's network run;
    refuse  when not even local fits: one error naming the image and what it would need,
            before the image is decoded (from the size its header declares).

The figures are per-pixel upper bounds of the peak resident memory a restore adds on top of the
loaded model, measured on CPU (benchmarks/restore_memory.py; results in
benchmarks/results/restore_memory.md) with a margin. They are estimates of a process's memory, not
a hard limit the allocator enforces.

The pixel-wise mode (`mode="pw"`) holds more: its weight map resized to the image and to every
level (held whole by whole-image and exact runs; a local tile resizes its own window), and, in every
run of the whole network (the image, or a local tile), the per-pixel LoRA path's deltas beside the
adapted convolutions' outputs (per-pixel weights cannot be merged into the weights). Its `seg`
source adds one more backbone pass before the adapted one, on the whole image (models/restorer.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

DEFAULT_BUDGET = 2 * 1024**3
# Bytes per image pixel held whatever the tiling: the float input and output tensors (12 + 12)
# and the stored output's samples (3, 6 at 16 bit). Measured: about 27.
IMAGE_BYTES = 30
# Float32 values per pixel and per unit of backbone width (`dim`), at the first level's resolution:
# EXACT: what exact tiling keeps whole (every level's skips, block inputs and outputs; measured
# 7 to 11 between runs of the same image: the allocator's arenas vary; plus 2 since the attention's
# V is kept between its two passes: one map of the block's width, 2 dim at the first level); WHOLE:
# a whole-image (or one tile's) run, the blocks' wide maps included (about 25).
EXACT_FLOATS = 14
WHOLE_FLOATS = 28
# Fixed working memory of one restore besides the above (the estimator, allocator slack).
OVERHEAD = 96 * 1024**2
TILINGS = ("auto", "exact", "local")
# Pixel-wise mode. Measured at 1 MP (1152x864, tiny, five LoRA adapters and a dense estimator, tile
# 512; one `abair restore` process each, as benchmarks/restore_memory.py does) against sw on the same
# photo: exact tiling +38 MB (the map at the image's size and area-averaged to each level: 1.7 floats
# per pixel and column of the 6), local tiling +225 MB (a 512 px tile's whole-network run: 14 floats
# more per pixel and unit of width), the seg source with exact tiling +623 MB while its extra pass ran
# whole (1803 MB added in all, within a whole run's WHOLE_FLOATS; that pass now runs exact-tiled
# too and is planned as such). PW_MAP_FLOATS: floats per pixel and
# weight-map column; PW_RUN_FLOATS: what WHOLE_FLOATS is for a pw run of the whole network.
PW_MAP_FLOATS = 2
PW_RUN_FLOATS = 44


@dataclass(frozen=True)
class Plan:
    tiling: str            # "whole" (fits in one tile), "exact" or "local"
    tile: int | None       # tile side in pixels (None: whole)
    estimate: int          # bytes

    @property
    def restore_tiling(self) -> str:
        """The `tiling` Restorer.restore takes for this plan (a whole image needs no tiles)."""
        return "exact" if self.tiling == "whole" else self.tiling

    @property
    def layout(self) -> str:
        return "whole" if self.tile is None else f"{self.tiling} tiles of {self.tile} px"

    def describe(self) -> str:
        return f"{self.layout}, ~{format_bytes(self.estimate)}"


class DoesNotFit(ValueError):
    """No tiling fits the budget; the message says what the image would need."""


def parse_bytes(text: str | int | None) -> int | None:
    """"2GB", "1.5 GiB", "800MB", "512M", "1000000" -> bytes (binary units); 0 or None -> None (no budget)."""
    if text is None or text == 0:
        return None
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 2GB, 1500MB)")
    value = float(match[1]) * 1024 ** " kmgt".index(match[2] or " ")
    return None if value == 0 else int(value)


def format_bytes(n: int) -> str:
    return f"{n / 1024**3:.2f} GB" if n >= 1024**3 else f"{n / 1024**2:.0f} MB"


def tile_side(max_pixels: int | None) -> int | None:
    """The tile side models.restorer.tile_side derives from a pixel budget (a multiple of 8;
    kept here too so that planning does not import torch)."""
    return None if not max_pixels else math.isqrt(int(max_pixels)) // 8 * 8


def network_bytes(dim: int, pixels: int, floats: int) -> int:
    return 4 * floats * dim * pixels


def image_bytes(height: int, width: int) -> int:
    """What a restore holds for the image itself, whatever the tiling."""
    return IMAGE_BYTES * height * width + OVERHEAD


def pw_map_bytes(pixels: int, columns: int) -> int:
    """The pixel-wise map held at the image's size and its levels (`columns`: adapters + keep)."""
    return 4 * PW_MAP_FLOATS * columns * pixels


def estimate(dim: int, height: int, width: int, tiling: str, tile: int | None, mode: str = "sw",
             columns: int = 0, pw_source: str | None = None, run_floats: int | None = None) -> int:
    """Peak bytes a restore adds for an image of height x width with this tiling; mode "pw" with a
    weight map of `columns` columns (adapters + keep) from `pw_source` (dense | seg); `run_floats`:
    what a run of the whole network holds per pixel and unit of width, where the runtime is not
    torch's (WHOLE_FLOATS / PW_RUN_FLOATS)."""
    pixels = height * width
    image = image_bytes(height, width)
    pixel_wise = mode == "pw"
    run_floats = run_floats or (PW_RUN_FLOATS if pixel_wise else WHOLE_FLOATS)
    held_map = pw_map_bytes(pixels, columns) if pixel_wise else 0
    if tile is None or (height <= tile and width <= tile):
        total = image + network_bytes(dim, pixels, run_floats) + held_map
    elif tiling == "exact":
        # the tiles run inside the blocks: the per-pixel deltas exist for one tile of one layer at a time
        total = image + network_bytes(dim, pixels, EXACT_FLOATS) + network_bytes(dim, tile * tile, WHOLE_FLOATS) \
            + held_map
    else:
        total = image + network_bytes(dim, tile * tile, run_floats)
    if pixel_wise and pw_source == "seg":
        # the segmentation head's backbone pass runs before the adapted one: whole when the image
        # fits one tile, else with exact tiling (whatever the adapted pass uses); its logits and
        # their probabilities are image-sized (at most one per map column)
        if tile is None or (height <= tile and width <= tile):
            seg_pass = network_bytes(dim, pixels, WHOLE_FLOATS)
        else:
            seg_pass = network_bytes(dim, pixels, EXACT_FLOATS) + network_bytes(dim, tile * tile, WHOLE_FLOATS)
        total = max(total, image + seg_pass + pw_map_bytes(pixels, columns))
    return total


def plan(dim: int, height: int, width: int, tile: int | None, tiling: str = "auto",
         budget: int | None = DEFAULT_BUDGET, mode: str = "sw", columns: int = 0,
         pw_source: str | None = None, run_floats: int | None = None) -> Plan:
    """The tiling for one image: the requested one, or with "auto" exact where it fits the budget,
    else local. `tile` is the tile side the pixel budget gives (None: whole images); mode, columns
    and pw_source as in `estimate`. Raises DoesNotFit, saying what it would take, when the choice
    cannot fit."""
    if tiling not in TILINGS:
        raise ValueError(f"tiling must be one of {TILINGS}, got {tiling!r}")
    if tile is None or (height <= tile and width <= tile):
        choices = ["whole"]
    else:
        choices = ["exact", "local"] if tiling == "auto" else [tiling]
    plans = [Plan(c, None if c == "whole" else tile, estimate(dim, height, width, c, tile, mode, columns, pw_source,
                                                              run_floats))
             for c in choices]
    for candidate in plans:
        if budget is None or candidate.estimate <= budget:
            return candidate
    best = min(plans, key=lambda p: p.estimate)
    hint = "raise --memory-budget"
    if best.tiling == "whole" and tile is None:
        hint += ", or set a tile budget (--max-pixels)"
    elif tiling == "exact":
        hint += " or use --tiling local"
    if mode == "pw" and pw_source == "seg":
        hint += " (or --pw-source dense: the seg source's extra backbone pass holds the whole image's skip connections)"
    floor = image_bytes(height, width)
    raise DoesNotFit(f"{width}x{height} px ({width * height / 1e6:.1f} MP) needs about {format_bytes(best.estimate)} "
                     f"{'run whole' if best.tile is None else 'in ' + best.layout} (the image's own arrays alone: {format_bytes(floor)}), "
                     f"over the memory budget of {format_bytes(budget)}: {hint}")


def plan_restore(restorer, height: int, width: int, max_pixels: int | None, tiling: str = "auto",
                 budget: int | None = DEFAULT_BUDGET, mode: str = "sw", pw_source: str | None = None) -> Plan:
    """`plan` for a Restorer (its backbone's width, its weight columns; in pw the map source it
    will use: `pw_source` or its default) and the tile side its pixel budget gives."""
    source = restorer.resolve_pw_source(pw_source) if mode == "pw" else None
    return plan(restorer.backbone.config.dim, height, width, tile_side(max_pixels), tiling, budget, mode,
                len(restorer.weight_names), source)
