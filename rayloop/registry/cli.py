"""``rayloop models``: the model repository on the command line.

Registered lazily by :mod:`rayloop.cli`; everything heavy is imported inside
the commands.
"""

from __future__ import annotations

import getpass
import json
import os
from typing import TYPE_CHECKING, Any

import click

from rayloop.clisupport import Group, byte_progress, print_json, settings

if TYPE_CHECKING:
    from rayloop.registry import ModelVersion, Registry


def _registry(ctx: click.Context) -> Registry:
    from rayloop.registry import Registry

    obj = ctx.ensure_object(dict)
    if "registry" not in obj:
        obj["registry"] = Registry.from_settings(settings(ctx))
    reg: Registry = obj["registry"]
    return reg


def _default_actor() -> str:
    try:
        return os.environ.get("RAYLOOP_ACTOR") or f"cli:{getpass.getuser()}"
    except Exception:  # no user name in some containers
        return "cli"


def _kv(values: tuple[str, ...], option: str) -> dict[str, Any]:
    """``k=v`` pairs; a value that parses as JSON is kept as JSON (numbers, bools, lists)."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=option)
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _expect(value: str | None) -> int | None:
    from rayloop.registry import ABSENT

    if value is None:
        return None
    if value.lower() in ("none", "absent", "unset"):
        return ABSENT
    try:
        v = int(value.lstrip("vV"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a version number or 'none'", param_hint="--expect") from None
    return v


def _size(n: int) -> str:
    f = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if f < 1024 or unit == "GiB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return str(n)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    Console().print(t)


def _version_rows(versions: list[ModelVersion]) -> list[list[Any]]:
    return [
        [
            v.version,
            v.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            _size(v.size_bytes),
            v.fingerprint[:12],
            v.parent,
            ", ".join(v.aliases),
            "deleted" if v.deleted_at else "",
        ]
        for v in versions
    ]


_VERSION_COLUMNS = ["version", "created (UTC)", "size", "fingerprint", "parent", "aliases", "state"]


def _show_version(mv: ModelVersion) -> None:
    from rich.console import Console

    c = Console()
    c.print(f"[bold]{mv.ref}[/bold]  fingerprint {mv.fingerprint}")
    c.print(f"uri: {mv.uri}")
    c.print(f"created: {mv.created_at.isoformat()} by {mv.created_by}; size {_size(mv.size_bytes)}")
    c.print(f"parent: {mv.parent if mv.parent is not None else '-'}; aliases: {', '.join(mv.aliases) or '-'}")
    for label, data in (("metadata", mv.metadata), ("lineage", mv.lineage), ("annotations", mv.annotations)):
        if data:
            c.print(f"{label}: {json.dumps(data, sort_keys=True)}")
    _table(
        "files",
        ["path", "size", "sha256"],
        [[p, _size(e["size"]), e["sha256"]] for p, e in sorted(mv.manifest.items())],
    )


@click.group(cls=Group)
def models() -> None:
    """Model repository: immutable versions, aliases, lineage.

    REF is name@3 (a version), name@production (an alias), name@latest (the
    highest live version) or name alone (= name@production).

    \b
    --json output (stable keys):
      register, show      a version: name, version, ref, fingerprint, manifest
                          {path: {sha256, size}}, size_bytes, created_at, created_by,
                          parent, metadata, lineage, annotations, uri, aliases, deleted_at
      list                [{name, versions, latest, aliases {alias: version}}]
      list NAME, lineage  [version, ...] (lineage: this version first, back to the base)
      alias               {name, alias, version, previous}
      history             [{time, name, alias, from, to, actor, reason}]
      verify              {ref, ok, files, size_bytes}
      fetch               {ref, path}
      delete              {ref, deleted}
      gc                  {name, deleted [versions], dry_run}
      annotate            {ref, key}
    Failures print `Type: message` and a hint on stderr and exit 1.
    """


@models.command("register")
@click.argument("name")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--parent", type=click.IntRange(1), help="Version of NAME this one derives from.")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="Metadata (repeatable; JSON values are parsed).")
@click.option(
    "--lineage",
    "lineage_kv",
    multiple=True,
    metavar="KEY=VALUE",
    help="Lineage: snapshot_id, code_version, job_id, training_config, metrics (repeatable).",
)
@click.option("--alias", "alias", help="Then point this alias at the new version (unconditionally).")
@click.option("--actor", default=None, help="Who registers (default cli:$USER); recorded with the version.")
@click.option("--json", "as_json", is_flag=True, help="Print the new version as JSON.")
@click.pass_context
def register_cmd(
    ctx: click.Context,
    name: str,
    model_dir: str,
    parent: int | None,
    meta: tuple[str, ...],
    lineage_kv: tuple[str, ...],
    alias: str | None,
    actor: str | None,
    as_json: bool,
) -> None:
    """Copy the HF model in MODEL_DIR into storage as a new version of NAME."""
    from rayloop.modelfiles import list_files

    reg = _registry(ctx)
    actor = actor or _default_actor()
    total = sum(p.stat().st_size for _, p in list_files(model_dir))
    with byte_progress(f"registering {name}", total) as progress:
        mv = reg.register(
            name,
            model_dir,
            parent=parent,
            metadata=_kv(meta, "--meta"),
            lineage=_kv(lineage_kv, "--lineage"),
            actor=actor,
            progress=progress,
        )
    if alias:
        reg.set_alias(name, alias, mv.version, actor=actor, reason="set at registration")
        mv = reg.resolve(mv.ref)
    if as_json:
        print_json(mv.to_json())
    else:
        click.echo(
            f"Registered {mv.ref} ({_size(mv.size_bytes)}, {len(mv.manifest)} files, fingerprint {mv.fingerprint[:12]})"
        )


@models.command("list")
@click.argument("name", required=False)
@click.option("--all", "include_deleted", is_flag=True, help="Include deleted versions (kept for lineage).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def list_cmd(ctx: click.Context, name: str | None, include_deleted: bool, as_json: bool) -> None:
    """List models, or the versions of NAME."""
    reg = _registry(ctx)
    if name:
        versions = reg.list_versions(name, include_deleted=include_deleted)
        if as_json:
            print_json([v.to_json() for v in versions])
        else:
            _table(f"{name}: versions", _VERSION_COLUMNS, _version_rows(versions))
        return
    summary: list[dict[str, Any]] = []
    for n in reg.list_models():
        vs = reg.list_versions(n)
        summary.append(
            {"name": n, "versions": len(vs), "latest": vs[-1].version if vs else None, "aliases": reg.aliases(n)}
        )
    if as_json:
        print_json(summary)
    else:
        rows = [
            [s["name"], s["versions"], s["latest"], ", ".join(f"{a}={v}" for a, v in s["aliases"].items())]
            for s in summary
        ]
        _table("models", ["name", "versions", "latest", "aliases"], rows)


@models.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def show_cmd(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Show one version: files, hashes, lineage, annotations, aliases."""
    mv = _registry(ctx).resolve(ref)
    if as_json:
        print_json(mv.to_json())
    else:
        _show_version(mv)


@models.command("alias")
@click.argument("name")
@click.argument("alias")
@click.argument("version", required=False, type=click.IntRange(1))
@click.option(
    "--expect", "expect", metavar="OLD", help="Move only if the alias points at OLD now ('none': only if unset)."
)
@click.option("--delete", "delete", is_flag=True, help="Remove the alias instead of moving it.")
@click.option("--reason", default="", help="Why (recorded in the audit log).")
@click.option("--actor", default=None, help="Who (default cli:$USER).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def alias_cmd(
    ctx: click.Context,
    name: str,
    alias: str,
    version: int | None,
    expect: str | None,
    delete: bool,
    reason: str,
    actor: str | None,
    as_json: bool,
) -> None:
    """Point ALIAS of NAME at VERSION (compare-and-set with --expect), or --delete it."""
    if delete == (version is not None):
        raise click.UsageError("give either VERSION or --delete")
    reg = _registry(ctx)
    actor = actor or _default_actor()
    previous: int | None
    if delete:
        previous = reg.delete_alias(name, alias, expect=_expect(expect), actor=actor, reason=reason)
    else:
        assert version is not None
        previous = reg.set_alias(name, alias, version, expect=_expect(expect), actor=actor, reason=reason)
    out = {"name": name, "alias": alias, "version": None if delete else version, "previous": previous}
    if as_json:
        print_json(out)
    elif delete:
        click.echo(f"Removed {name}@{alias} (was {previous}).")
    else:
        click.echo(f"{name}@{alias} -> {version} (was {previous if previous is not None else 'unset'}).")


@models.command("history")
@click.argument("name")
@click.option("--alias", default=None, help="Only this alias.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def history_cmd(ctx: click.Context, name: str, alias: str | None, as_json: bool) -> None:
    """Audit log of alias moves of NAME: time, from, to, actor, reason."""
    log = _registry(ctx).alias_history(name, alias)
    if as_json:
        print_json(log)
    else:
        rows = [[e["time"], e["alias"], e["from"], e["to"], e["actor"], e["reason"]] for e in log]
        _table(f"{name}: alias moves", ["time (UTC)", "alias", "from", "to", "actor", "reason"], rows)


@models.command("lineage")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def lineage_cmd(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Walk REF's parents back to the base model."""
    chain = _registry(ctx).lineage(ref)
    if as_json:
        print_json([v.to_json() for v in chain])
        return
    rows = [
        [
            v.ref,
            v.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            v.lineage.get("snapshot_id"),
            v.lineage.get("code_version"),
            json.dumps(v.lineage.get("metrics")) if v.lineage.get("metrics") else None,
            json.dumps(v.annotations.get("gate")) if "gate" in v.annotations else None,
            "deleted" if v.deleted_at else ", ".join(v.aliases),
        ]
        for v in chain
    ]
    _table("lineage", ["version", "created (UTC)", "snapshot", "code", "metrics", "gate", "aliases/state"], rows)


@models.command("verify")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def verify_cmd(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Re-hash every stored file of REF against its manifest."""
    reg = _registry(ctx)
    mv = reg.resolve(ref)
    with byte_progress(f"verifying {mv.ref}", mv.size_bytes) as progress:
        reg.verify(mv.ref, progress=progress)
    if as_json:
        print_json({"ref": mv.ref, "ok": True, "files": len(mv.manifest), "size_bytes": mv.size_bytes})
    else:
        click.echo(f"{mv.ref}: {len(mv.manifest)} files, {_size(mv.size_bytes)}, all hashes match.")


@models.command("fetch")
@click.argument("ref")
@click.option("--dest", type=click.Path(file_okay=False), help="Materialise here instead of the cache.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def fetch_cmd(ctx: click.Context, ref: str, dest: str | None, as_json: bool) -> None:
    """Download REF as a local HF model directory (verified; cached by fingerprint)."""
    reg = _registry(ctx)
    mv = reg.resolve(ref)
    with byte_progress(f"fetching {mv.ref}", mv.size_bytes) as progress:
        path = reg.fetch(mv.ref, dest, progress=progress)
    if as_json:
        print_json({"ref": mv.ref, "path": str(path)})
    else:
        click.echo(str(path))


@models.command("delete")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def delete_cmd(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Delete REF's artifacts (refused while aliased, deployed or in a rollout)."""
    reg = _registry(ctx)
    mv = reg.resolve(ref)
    reg.delete(mv.ref)
    if as_json:
        print_json({"ref": mv.ref, "deleted": True})
    else:
        click.echo(f"Deleted {mv.ref} (its record stays for lineage).")


@models.command("gc")
@click.argument("name")
@click.option("--keep", type=click.IntRange(0), required=True, help="Keep the newest N versions.")
@click.option("--dry-run", is_flag=True, help="Only print what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def gc_cmd(ctx: click.Context, name: str, keep: int, dry_run: bool, as_json: bool) -> None:
    """Delete old versions of NAME that no alias, deployment or rollout uses."""
    deleted = _registry(ctx).gc(name, keep, dry_run=dry_run)
    if as_json:
        print_json({"name": name, "deleted": deleted, "dry_run": dry_run})
    elif not deleted:
        click.echo(f"Nothing to delete for {name}.")
    else:
        verb = "Would delete" if dry_run else "Deleted"
        click.echo(f"{verb} {name} versions {', '.join(map(str, deleted))}.")


@models.command("annotate")
@click.argument("ref")
@click.argument("key")
@click.argument("value")
@click.option("--actor", default=None, help="Who (default cli:$USER).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def annotate_cmd(ctx: click.Context, ref: str, key: str, value: str, actor: str | None, as_json: bool) -> None:
    """Attach VALUE (JSON, or a plain string) under KEY to REF."""
    reg = _registry(ctx)
    mv = reg.resolve(ref)
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        parsed = value
    reg.annotate(mv.ref, key, parsed, actor=actor or _default_actor())
    if as_json:
        print_json({"ref": mv.ref, "key": key})
    else:
        click.echo(f"Annotated {mv.ref} with {key!r}.")
