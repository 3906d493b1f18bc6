"""``ray job submit --working-dir . -- python -m train_jobs.preprocess [--since T] [--model NAME]``.

Validates arguments into :class:`PreprocessArgs` and settings, then calls
:func:`rayloop.data.preprocess.preprocess`. The last stdout line is
``RAYLOOP_RESULT {json}`` with the snapshot id and counts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from train_jobs._args import common_parser, described, run, settings_from


class PreprocessArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: str | None = Field(default=None, description="Only interactions at or after this ISO date/datetime.")
    model: str | None = Field(default=None, description="Only interactions served by this model name.")
    base: str | None = Field(default=None, description="Parent model: NAME@REF in the registry, or a directory.")
    replay_snapshot: str | None = Field(default=None, description="Replay rows from this snapshot.")
    no_replay: bool = Field(default=False, description="Mix in none of the parent's training data.")


def main(argv: list[str]) -> dict[str, Any]:
    ap = common_parser("Build a training snapshot from the interaction store (Ray Data).")
    ap.add_argument("--since", help=described(PreprocessArgs, "since"))
    ap.add_argument("--model", help=described(PreprocessArgs, "model"))
    ap.add_argument("--base", help=described(PreprocessArgs, "base"))
    ap.add_argument("--replay-snapshot", help=described(PreprocessArgs, "replay_snapshot"))
    ap.add_argument("--no-replay", action="store_true", help=described(PreprocessArgs, "no_replay"))
    ns = ap.parse_args(argv)
    args = PreprocessArgs(
        since=ns.since, model=ns.model, base=ns.base, replay_snapshot=ns.replay_snapshot, no_replay=ns.no_replay
    )
    settings = settings_from(ns)

    from rayloop.data.preprocess import preprocess
    from rayloop.data.replay import ReplaySource, replay_for_model_dir
    from rayloop.data.sources import parse_since
    from rayloop.registry.parent import resolve_parent

    model_dir, model_name = resolve_parent(settings, args.model, args.base)
    replay: ReplaySource | None = None
    if args.replay_snapshot:
        replay = ReplaySource.from_snapshot(args.replay_snapshot)
    elif not args.no_replay:
        replay = replay_for_model_dir(model_dir)
    info = preprocess(
        settings, model_dir=model_dir, model_name=model_name, since=parse_since(args.since), replay=replay
    )
    return {"snapshot_id": info.snapshot_id, "uri": info.uri, "counts": info.counts, "reused": info.reused}


if __name__ == "__main__":
    run(main)
