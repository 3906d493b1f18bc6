"""``rayloop data ...``: build training snapshots from the interaction store."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import click

from rayloop.errors import ConfigError


def parse_since(value: str | None) -> datetime | None:
    """ISO date or datetime (``2026-01-31``, ``2026-01-31T12:00:00+00:00``); naive means UTC."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"--since {value!r} is not an ISO date or datetime", hint="Use e.g. 2026-01-31 or 2026-01-31T12:00:00Z."
        ) from None


def resolve_parent(settings: Any, model: str | None, base: str | None) -> tuple[Path, str | None]:
    """The parent model directory: an explicit path, a registry ref, or the demo base model."""
    if base and Path(base).is_dir():
        return Path(base), model
    if base:
        from rayloop.registry import Registry

        reg = Registry.from_settings(settings)
        mv = reg.resolve(base)
        return reg.fetch(base), model or mv.name
    from rayloop.demo.setup import base_model_dir

    d = base_model_dir(settings)
    if not (d / "config.json").is_file():
        raise ConfigError(
            f"no parent model given and no demo base model in {str(d)!r}",
            hint="Pass --base NAME@REF (a registry version) or a model directory, or run `rayloop init`.",
        )
    return d, model


@click.group()
def data() -> None:
    """Interaction store -> training snapshots (Ray Data)."""


@data.command("preprocess")
@click.option("--since", help="Only interactions at or after this ISO date/datetime.")
@click.option("--model", "model_name", help="Only interactions served by this model name.")
@click.option("--base", help="Parent model (tokenizer, chat template, replay): NAME@REF or a directory.")
@click.option("--replay-snapshot", help="Replay rows from this snapshot instead of the parent's own data.")
@click.option("--no-replay", is_flag=True, help="Do not mix in any of the parent's training data.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def preprocess_cmd(
    ctx: click.Context,
    since: str | None,
    model_name: str | None,
    base: str | None,
    replay_snapshot: str | None,
    no_replay: bool,
    as_json: bool,
) -> None:
    """Join feedback, select, dedupe, scrub, tokenize and pack into a snapshot."""
    from rayloop.clisupport import print_json, settings
    from rayloop.data.preprocess import preprocess
    from rayloop.data.replay import ReplaySource, replay_for_model_dir

    s = settings(ctx)
    model_dir, model_name = resolve_parent(s, model_name, base)
    replay: ReplaySource | None = None
    if replay_snapshot:
        replay = ReplaySource.from_snapshot(replay_snapshot)
    elif not no_replay:
        replay = replay_for_model_dir(model_dir)
    info = preprocess(s, model_dir=model_dir, model_name=model_name, since=parse_since(since), replay=replay)
    if as_json:
        print_json(info.manifest)
        return
    c = info.counts
    click.echo(
        f"snapshot {info.snapshot_id}{' (already existed)' if info.reused else ''}: "
        f"{c['train_pairs']} train pairs ({c['replay_rows']} replay), {c['eval_pairs']} eval pairs, "
        f"{c['train_blocks']} train blocks; from {c['requests']} interactions, {c['selected']} selected, "
        f"{c['duplicates_removed']} duplicates removed"
    )
    click.echo(info.uri)
