"""Turn a `fastdiff bench --quality` JSON into the tables the docs show, with the two verdicts.

    python benchmarks/quality_table.py .runs/digits_sd3_peers.json

1. Against vanilla with fewer steps: vanilla's FID-digits interpolated (linearly in FLOPs) at
   each setting's FLOPs; a setting beats it when its FID is lower by more than the seed noise.
2. Against each peer point: the best fastdiff FID-digits among settings that cost no more
   FLOPs (1 % slack). "win" = lower by more than the seed noise, "tie" = within it, "loss" =
   higher by more than it, "none" = no fastdiff setting is that cheap.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastdiff.check_only import exit_if_check_only
from fastdiff.evals.quality import SEED_CHECK


def _vanilla_at(vanilla: list[dict], flops: float) -> float | None:
    """Vanilla's FID at ``flops``, linear between the two step counts around it."""
    points = sorted((p["denoiser_gflops_per_image"], p["fid_real"]) for p in vanilla)
    for (f0, q0), (f1, q1) in zip(points, points[1:]):
        if f0 <= flops <= f1:
            return q0 + (q1 - q0) * (flops - f0) / (f1 - f0)
    return None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report")
    args = parser.parse_args()
    exit_if_check_only(parser.prog)
    data = json.loads(Path(args.report).read_text())
    points = data["points"]
    noise = data.get("seed_noise") or 0.0
    vanilla = [p for p in points if p.get("kind", "method") == "vanilla" and p["label"] != SEED_CHECK]
    ours = [p for p in points if p.get("kind", "method") == "method"]
    peers = [p for p in points if p.get("kind") == "peer"]
    full = vanilla[0]["denoiser_gflops_per_image"]

    print(f"N = {data['samples']}, seed noise (FID-digits between two seed sets) = {noise:.3f}\n")
    print("| setting | steps | GFLOP/img | FLOP ratio | s/img | FID-digits | vanilla at equal FLOPs | "
          "FID vs vanilla | PSNR vs vanilla | adherence |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in points:
        at = _vanilla_at(vanilla, p["denoiser_gflops_per_image"]) if p.get("kind") != "vanilla" else None
        mark = ""
        if at is not None:
            margin = at - p["fid_real"]
            mark = " **(beats)**" if margin > noise else " (loses)" if margin < -noise else ""
        print(f"| {p['label']} | {p['steps']} | {p['denoiser_gflops_per_image']:.3f} | "
              f"{full / p['denoiser_gflops_per_image']:.2f}× | {p['seconds_per_image']:.4f} | {p['fid_real']:.3f}{mark} | "
              f"{_fmt(at)} | {_fmt(p['fid_vs_reference'])} | {_fmt(p['psnr_vs_reference'], 2)} | "
              f"{p['adherence']:.1%} |")
    for note in data.get("notes", []):
        print(f"\n- {note}")

    if peers:
        print("\n| peer setting | GFLOP/img | FID-digits | best fastdiff at ≤ its FLOPs | FID-digits | verdict |")
        print("|---|---|---|---|---|---|")
        for peer in peers:
            cheaper = [p for p in ours if p["denoiser_gflops_per_image"] <= peer["denoiser_gflops_per_image"] * 1.01]
            if not cheaper:
                print(f"| {peer['label']} | {peer['denoiser_gflops_per_image']:.3f} | {peer['fid_real']:.3f} | – | – | none |")
                continue
            best = min(cheaper, key=lambda p: p["fid_real"])
            margin = peer["fid_real"] - best["fid_real"]
            verdict = "win" if margin > noise else "loss" if margin < -noise else "tie"
            print(f"| {peer['label']} | {peer['denoiser_gflops_per_image']:.3f} | {peer['fid_real']:.3f} | "
                  f"{best['label']} ({best['denoiser_gflops_per_image']:.3f}) | {best['fid_real']:.3f} | {verdict} |")


if __name__ == "__main__":
    main()
