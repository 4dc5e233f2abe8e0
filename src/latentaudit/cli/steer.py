"""``latentaudit steer``: prove or refute attributed latents by steering, graded by a judge."""

from __future__ import annotations

import argparse

from latentaudit import runfolder as rf
from latentaudit.cli import DEVICE_HELP, batch_size_arg
from latentaudit.cli._options import Config, Flag, comma_ints

NAME = "steer"
HELP = "Steer the latents of an attribution run and measure the behaviour rate (the causal test)."
DESCRIPTION = (
    "Steer each latent of an attribution run (top-K by Δ-attribution, by Δ-activation, and K "
    "random latents as the null) away from and toward the behaviour, sample completions on "
    "held-out prompts with the same seeds as the unsteered baseline, grade them with a judge, "
    "and write steering.jsonl (rates, paired changes and bootstrap CIs, incoherence, first-token "
    "log-odds change), steering_summary.json, steering_logodds.jsonl and figures into the run "
    "folder (or --out). A killed sweep resumes where it stopped. Every input is checked before "
    "the model loads.")


CONFIG = Config("latentaudit.steer.config", "SteerConfig",
                methods=Flag(suffix=" Comma-separated."),
                directions=Flag(suffix=" Comma-separated."),
                batch_size=Flag(type=batch_size_arg),
                logodds=Flag(help="Skip the first-token log-odds check."))
"""The SteerConfig flags (each written once, as its field; here only where a flag differs)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from latentaudit.cli._engine import add_engine_options
    from latentaudit.cli.judge import add_api_options

    p.add_argument("--from", dest="run", metavar="RUN_DIR",
                   help="Attribution run folder (from `latentaudit attribute`).")
    p.add_argument("--latents", type=comma_ints, help="Steer these latent ids (comma-separated) as "
                   "the 'given' set, besides or instead of a run's.")
    p.add_argument("--data", help="The run's behaviour dataset, when its manifest path is not "
                                  "reachable from here (its prompts are left out).")
    p.add_argument("--model", help="Model (default: the run's).")
    p.add_argument("--sae", help="SAE path or 'default' (default: the run's).")
    p.add_argument("--layer", type=int, help="Layer (default: the run's, else the SAE's).")
    p.add_argument("--hook", default="auto",
                   choices=["auto", "resid_pre", "attn_out", "resid_mid", "mlp_out",
                            "resid_post"],
                   help="Hook point steered (α·d is added there): auto (the SAE's) or the "
                        "point its config records; another is an error.")
    p.add_argument("--prompts", help="Prompts to steer on: a suite name, JSONL or .txt file "
                                     "(default: the suite named like the rubric). Prompts the "
                                     "run's dataset used are left out.")
    p.add_argument("--rubric", default="false-belief", help="Rubric the judge grades by.")
    p.add_argument("--judge", default="auto", help="Judge spec, as for `latentaudit judge`.")
    p.add_argument("--coherence-judge", default="rules",
                   help="Judge of the rubric's 'coherent' question when --judge does not answer "
                        "it ('none': no incoherence measure).")
    add_api_options(p)
    p.add_argument("--toward-model", help="Steer toward the behaviour on this model instead "
                                          "(e.g. one that does not misbehave).")
    p.add_argument("--base-model", help="Base model for the model-diffing baseline "
                                        "(--methods ...,model-diff).")
    p.add_argument("--out", help="Output folder (default: the run folder).")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="float32", help="Model dtype: float32, bfloat16 or float16.")
    CONFIG.add(p)
    add_engine_options(p)


def run(args: argparse.Namespace) -> int:
    from latentaudit.cli._engine import engine_from_args
    from latentaudit.cli.judge import judge_options
    from latentaudit.judges.base import check_model_options
    from latentaudit.steer import plan_steering, run_steering

    cfg = CONFIG.build(args)
    check_model_options(args.device, args.dtype, cfg.batch_size or 1)  # 0: auto
    engine = engine_from_args(args)
    coherence = None if args.coherence_judge == "none" else args.coherence_judge
    plan = plan_steering(cfg, run=args.run, latents=args.latents, model=args.model, sae=args.sae,
                         layer=args.layer, prompts=args.prompts, rubric=args.rubric,
                         judge=args.judge, coherence_judge=coherence, out=args.out,
                         data=args.data, toward_model=args.toward_model,
                         base_model=args.base_model, hook=args.hook,
                         judge_options=judge_options(args.judge, args))
    print(f"steering on {len(plan.prompts)} held-out prompts ({plan.excluded_prompts} used by "
          f"attribution left out), {cfg.n} completions each per condition")
    result = run_steering(plan, device=args.device, dtype=args.dtype, engine=engine)
    for line in summary_lines(result) if not cfg.logodds_only else logodds_lines(result):
        print(line)
    files = [rf.STEERING, rf.STEERING_SUMMARY] + ([rf.STEERING_LOGODDS] if result.logodds else [])
    files += [f.name for f in result.figures]
    print(f"\nwrote {', '.join(files)} into {result.out}")
    return 0


def logodds_lines(result) -> list[str]:
    """Mean first-token log-odds change per selection method, direction and strength."""
    groups: dict[tuple, list[float]] = {}
    for r in result.logodds:
        groups.setdefault((r["method"], r["direction"], r["strength"]), []).append(r["change"])
    lines = [f"{'method':<12} {'direction':<9} {'strength':>8} {'latents':>7} "
             f"{'mean Δlog-odds':>14} {'min':>8} {'max':>8}"]
    for (m, d, s), v in groups.items():
        lines.append(f"{m:<12} {d:<9} {s:>8g} {len(v):>7} {sum(v) / len(v):>+14.3f} "
                     f"{min(v):>+8.3f} {max(v):>+8.3f}")
    return lines


def summary_lines(result) -> list[str]:
    """One line per selection method, direction and strength."""
    if result.resid_norm is not None:
        lines = [f"mean residual norm at the layer: {result.resid_norm:.2f} (strengths are "
                 "multiples of it)"]
    else:
        lines = []
    lines.append(f"{'method':<12} {'direction':<9} {'strength':>8} {'latents':>7} "
                 f"{'mean Δrate [CI]':>22} {'beyond null':>11} {'mean Δlog-odds [CI]':>22}")
    for s in result.summary:
        strength = "searched" if s["searched"] else f"{s['strength']:g}"
        md = _with_ci(s["mean_diff"], s["mean_diff_ci"])
        lo = _with_ci(s["mean_logodds_change"], s["mean_logodds_change_ci"])
        beyond = "-" if s["method"] == "random" else str(s["beyond_null"])
        lines.append(f"{s['method']:<12} {s['direction']:<9} {strength:>8} {s['latents']:>7} "
                     f"{md:>22} {beyond:>11} {lo:>22}")
    return lines


def _with_ci(value: float | None, ci: list) -> str:
    if value is None:
        return "-"
    if ci[0] is None:
        return f"{value:+.3f}"
    return f"{value:+.3f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"
