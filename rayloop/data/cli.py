"""``rayloop data ...``: build training snapshots from the interaction store."""

from __future__ import annotations

import click


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
    from rayloop.data.sources import parse_since
    from rayloop.registry.parent import resolve_parent

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


@data.command("prune")
@click.option(
    "--older-than",
    "older_than",
    type=click.IntRange(min=1),
    help="Age in days (default: data.retention_days).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def prune_cmd(ctx: click.Context, older_than: int | None, dry_run: bool, as_json: bool) -> None:
    """Delete captured interactions, feedback and shadow pairs older than the retention age."""
    from rayloop.clisupport import print_json, settings
    from rayloop.data.governance import prune

    report = prune(settings(ctx), older_than_days=older_than, dry_run=dry_run)
    if as_json:
        print_json(report.to_dict())
        return
    verb = "would delete" if dry_run else "deleted"
    if not report.partitions:
        click.echo(f"nothing dated before {report.cutoff}")
    for table, parts in report.partitions.items():
        click.echo(f"{table}: {verb} {len(parts)} partitions ({report.files[table]} files) before {report.cutoff}")


@data.command("forget")
@click.option("--user", "user_id", required=True, help="The user id clients sent (the `user` field).")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def forget_cmd(ctx: click.Context, user_id: str, dry_run: bool, as_json: bool) -> None:
    """Remove a user's interactions and feedback everywhere rayloop keeps them; mark what was built from them."""
    from rayloop.clisupport import print_json, settings
    from rayloop.data.governance import forget_user

    report = forget_user(settings(ctx), user_id, dry_run=dry_run)
    if as_json:
        print_json(report.to_dict())
        return
    verb = "would remove" if dry_run else "removed"
    rows = ", ".join(f"{n} {table}" for table, n in report.rows_removed.items()) or "no rows"
    click.echo(f"subject {report.subject}: {report.requests} requests; {verb} {rows}")
    if report.snapshots_marked:
        click.echo(f"snapshots marked (not trainable again): {', '.join(report.snapshots_marked)}")
    if report.versions_marked:
        click.echo(f"versions trained on them (annotated forgotten_data): {', '.join(report.versions_marked)}")
