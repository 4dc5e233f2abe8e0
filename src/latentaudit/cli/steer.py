"""``latentaudit steer``: prove or refute attributed latents by steering, graded by a judge."""

from __future__ import annotations

import argparse

from latentaudit import runfolder as rf
from latentaudit.cli import DEVICE_HELP, batch_size_arg, field_docs

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


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated latent ids, got {text!r}") \
            from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    from latentaudit.cli._engine import add_engine_options
    from latentaudit.cli.judge import add_api_options

    doc = field_docs("steer/config.py", "SteerConfig")
    p.add_argument("--from", dest="run", metavar="RUN_DIR",
                   help="Attribution run folder (from `latentaudit attribute`).")
    p.add_argument("--latents", type=_ints, help="Steer these latent ids (comma-separated) as "
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
    p.add_argument("--top-k", type=int, default=10, help=doc["top_k"])
    p.add_argument("--methods", type=_names, default=("attribution", "activation", "random"),
                   help=doc["methods"] + " Comma-separated.")
    p.add_argument("--directions", type=_names, default=("away", "toward"),
                   help=doc["directions"] + " Comma-separated.")
    p.add_argument("--strengths", type=_floats, default=(0.5,), help=doc["strengths"])
    p.add_argument("--scale", default="relative", choices=["relative", "absolute"],
                   help=doc["scale"])
    p.add_argument("--search", action="store_true", help=doc["search"])
    p.add_argument("--max-incoherence", type=float, default=0.10, help=doc["max_incoherence"])
    p.add_argument("--search-n", type=int, default=24, help=doc["search_n"])
    p.add_argument("--joint", action="store_true", help=doc["joint"])
    p.add_argument("--n", type=int, default=2, help=doc["n"])
    p.add_argument("--max-prompts", type=int, help=doc["max_prompts"])
    p.add_argument("--temperature", type=float, default=1.0, help=doc["temperature"])
    p.add_argument("--top-p", type=float, default=0.9, help=doc["top_p"])
    p.add_argument("--max-new-tokens", type=int, default=48, help=doc["max_new_tokens"])
    p.add_argument("--seed", type=int, default=0, help=doc["seed"])
    p.add_argument("--batch-size", type=batch_size_arg, default=32, help=doc["batch_size"])
    p.add_argument("--system", help=doc["system"])
    p.add_argument("--n-boot", type=int, default=2000, help=doc["n_boot"])
    p.add_argument("--level", type=float, default=0.95, help=doc["level"])
    p.add_argument("--random-seed", type=int, default=0, help=doc["random_seed"])
    p.add_argument("--no-logodds", action="store_true", help="Skip the first-token log-odds check.")
    p.add_argument("--logodds-top", type=int, default=100, help=doc["logodds_top"])
    p.add_argument("--logodds-prompts", type=int, help=doc["logodds_prompts"])
    p.add_argument("--logodds-only", action="store_true", help=doc["logodds_only"])
    add_engine_options(p)


def config_from_args(args: argparse.Namespace):
    from latentaudit.steer import SteerConfig

    return SteerConfig(
        top_k=args.top_k, methods=args.methods, directions=args.directions,
        strengths=args.strengths, scale=args.scale, search=args.search,
        max_incoherence=args.max_incoherence, search_n=args.search_n, joint=args.joint, n=args.n,
        max_prompts=args.max_prompts, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
        system=args.system, n_boot=args.n_boot, level=args.level, random_seed=args.random_seed,
        logodds=not args.no_logodds, logodds_top=args.logodds_top,
        logodds_prompts=args.logodds_prompts, logodds_only=args.logodds_only)


def run(args: argparse.Namespace) -> int:
    from latentaudit.cli._engine import engine_from_args
    from latentaudit.cli.judge import judge_options
    from latentaudit.judges.base import check_model_options
    from latentaudit.steer import plan_steering, run_steering

    cfg = config_from_args(args)
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
