"""From a community's posts and engagement events to training pairs: the work of scripts/social_pairs.py (its --help
says the rule in words; docs/social_pairs.md the rest). Inputs are checked, the rule (rule.py) runs on an engine
(engines.py), and the pairs, the report and the Pick-a-Pic layout are written whole.

    report = social_pairs("posts.parquet", "events.parquet", out="pairs/")            # DuckDB, embedded
    report = social_pairs("posts.parquet", "events.parquet", out="pairs/", engine="spark")
    print(report_markdown(report))
"""
import hashlib
import io
import json
import os
import re

from social_reward.errors import InputError
from social_reward.mining.engines import ENGINES
from social_reward.mining.rule import STRATA, rule_steps, split_query, sql_text
from social_reward.outputs import check_new_folder, folder_written_whole

POST_COLUMNS = ("post", "image", "prompt", "creator", "posted_at")


EVENT_COLUMNS = ("post", "user", "kind", "at")


UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


PICKAPIC_ROWS_PER_SHARD = 1000


def window_seconds(window):
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", str(window).strip())
    if not match:
        raise InputError(f"--window {window}: expected a number and a unit (s, m, h, d, w), e.g. 7d")
    return float(match[1]) * UNITS[match[2]]


def _name(source, what):
    return f"{what} {source}" if isinstance(source, str) else f"{what} (DataFrame)"


def _check_columns(engine, view, needed, where):
    found = engine.columns(view)
    missing = [c for c in needed if c not in found]
    if missing:
        raise InputError(f"{where}: missing column {', '.join(map(repr, missing))} (found: {', '.join(found)})")
    return found


def _first_bad_time(engine, view, column, where, condition="TRUE"):
    bad = engine.rows(f"""SELECT post, CAST("{column}" AS VARCHAR) FROM {view}
                          WHERE {condition} AND TRY_CAST("{column}" AS TIMESTAMP) IS NULL LIMIT 1""")
    if bad:
        raise InputError(f"{where}: post {bad[0][0]!r}: {column} {bad[0][1]!r} is not a timestamp")


def _image_keys(paths, skip_bad_images):
    """(image, image_key, opens) for --check_images: the content's sha256, so one image under two paths is one image."""
    import pandas as pd
    from PIL import Image
    rows, bad = [], []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
            rows.append((path, hashlib.sha256(data).hexdigest(), True))
        except Exception:  # noqa: BLE001 - any failure to read or decode makes the image bad
            bad.append(path)
            rows.append((path, path, False))
    if bad and not skip_bad_images:
        raise InputError(f"--check_images: {len(bad)} image(s) do not open: {', '.join(bad[:5])}"
                         f"{', ...' if len(bad) > 5 else ''}; pass --skip_bad_images to leave their pairs out")
    return pd.DataFrame(rows, columns=["image", "image_key", "opens"]), bad


def social_pairs(posts, events=None, out="pairs", signal="remix", window="7d", min_positive=1, max_negative=0,
                 min_views=0, pair_within=None, max_pairs_per_stratum=16, max_pairs_per_creator=None, seed=0,
                 split="creator", test_after=None, test_fraction=0.1, check_images=False, skip_bad_images=False,
                 layout="table", engine="duckdb", memory_limit=None, threads=None, overwrite=False):
    """Mine (prompt, preferred image, other image) pairs from POSTS and EVENTS (paths to parquet/csv, globs, or
    DataFrames) into `out`; returns the report (a dict, also written as report.json and report.md).

        report = social_pairs("posts.parquet", "events.parquet", out="pairs")
        report = social_pairs(posts_df, events_df, out="pairs", pair_within="creator_day", engine="spark")
    """
    if engine not in ENGINES:
        raise InputError(f"--engine {engine}: unknown; choose from {', '.join(ENGINES)}")
    if layout not in ("table", "pickapic"):
        raise InputError(f"--layout {layout}: unknown; choose from table, pickapic")
    if split not in ("creator", "time"):
        raise InputError(f"--split {split}: unknown; choose from creator, time")
    if split == "time":
        import pandas as pd  # here and below only where needed: the plain command starts in a quarter of the time
        try:
            test_after = str(pd.Timestamp(test_after).tz_localize(None) if pd.Timestamp(test_after).tz
                             else pd.Timestamp(test_after))
        except (TypeError, ValueError):
            raise InputError(f"--split time needs --test_after DATE (got {test_after!r})") from None
    if min_positive <= max_negative:
        raise InputError(f"--min_positive {min_positive} must be above --max_negative {max_negative}: a post cannot "
                         f"be both a positive and a negative")
    if not 0 <= test_fraction < 1:
        raise InputError(f"--test_fraction {test_fraction}: must be in [0, 1)")
    for flag, value in (("--max_pairs_per_stratum", max_pairs_per_stratum), ("--max_pairs_per_creator",
                                                                              max_pairs_per_creator)):
        if value is not None and value < 1:
            raise InputError(f"{flag} {value}: must be at least 1")
    keep = [p for p in (posts, events) if isinstance(p, str) and os.path.exists(p)]
    check_new_folder(out, overwrite, keep=keep)
    options = dict(signal=signal, window_seconds=window_seconds(window), min_positive=min_positive,
                   max_negative=max_negative, min_views=min_views, max_pairs_per_stratum=max_pairs_per_stratum,
                   max_pairs_per_creator=max_pairs_per_creator, seed=seed, split=split, test_after=test_after,
                   test_fraction=test_fraction, image_keys=check_images)
    db = ENGINES[engine](memory_limit=memory_limit, threads=threads)
    try:
        report = _mine(db, posts, events, options, pair_within, skip_bad_images)
        with folder_written_whole(out) as tmp:
            for name in ("train", "test"):
                db.write_parquet(split_query(name), os.path.join(tmp, f"{name}.parquet"))
            if layout == "pickapic":
                _write_pickapic(db, tmp)
            with open(os.path.join(tmp, "report.json"), "w") as f:
                json.dump(report, f, indent=1, default=str)
            with open(os.path.join(tmp, "report.md"), "w") as f:
                f.write(report_markdown(report))
    finally:
        db.close()
    return report


def _mine(db, posts, events, o, pair_within, skip_bad_images):
    """Check the inputs, run the rule's steps, and count what each removed; raises where no pair is left."""
    where_posts, where_events = _name(posts, "POSTS"), _name(events, "EVENTS")
    db.load("raw_posts", posts)
    needed = POST_COLUMNS + (() if events is not None else (o["signal"],))
    columns = _check_columns(db, "raw_posts", needed, where_posts)
    pair_within = pair_within or ("group" if "group" in columns else "creator_day")
    if pair_within not in STRATA:
        raise InputError(f"--pair_within {pair_within}: unknown; choose from {', '.join(STRATA)}")
    if pair_within == "group" and "group" not in columns:
        raise InputError(f"--pair_within group: {where_posts} has no column 'group' (found: {', '.join(columns)})")
    # one pass for both: posts without an id (their group is NULL) and ids given twice
    bad = db.rows("SELECT post, count(*) FROM raw_posts GROUP BY post HAVING post IS NULL OR count(*) > 1 "
                  "ORDER BY post NULLS FIRST LIMIT 1")
    if bad and bad[0][0] is None:
        raise InputError(f"{where_posts}: {bad[0][1]} row(s) without a post id (column 'post' empty)")
    if bad:
        raise InputError(f"{where_posts}: post {bad[0][0]!r} appears more than once")
    _first_bad_time(db, "raw_posts", "posted_at", where_posts)
    o["pair_within"] = pair_within
    report = {"options": {**{k: v for k, v in o.items() if k != "image_keys"}, "check_images": o["image_keys"]},
              "posts": db.rows("SELECT count(*) FROM raw_posts")[0][0]}
    event_columns = None
    if events is not None:
        db.load("raw_events", events)
        event_columns = _check_columns(db, "raw_events", EVENT_COLUMNS, where_events)
        kinds = dict(db.rows("SELECT CAST(kind AS VARCHAR), count(*) FROM raw_events GROUP BY kind ORDER BY kind"))
        if o["signal"] not in kinds:
            raise InputError(f"--signal {o['signal']}: no such kind in {where_events} "
                             f"(kinds present: {', '.join(map(str, kinds)) or 'none, no rows'})")
        report["events"] = {"rows": sum(kinds.values()), "by_kind": kinds}
    for name, query in rule_steps(o, columns, event_columns):
        db.create(name, query)
        if name == "fates":
            fates = {fate: (int(n), int(pairs)) for fate, n, pairs in
                     db.rows("SELECT fate, sum(events), count(*) FROM fates GROUP BY fate")}
            if "bad_time" in fates:
                _first_bad_time(db, "raw_events", "at", where_events, f"kind = {sql_text(o['signal'])}")
            counted, counted_pairs = fates.get("counted", (0, 0))
            report["events"].update({
                "signal_events": sum(n for n, _ in fates.values()),
                "unknown_post": fates.get("unknown_post", (0, 0))[0], "self": fates.get("self", (0, 0))[0],
                "before_post": fates.get("before_post", (0, 0))[0], "late": fates.get("late", (0, 0))[0],
                "repeats": counted - counted_pairs, "counted_users": counted_pairs})
            if report["events"]["unknown_post"]:
                print(f"{where_events}: {report['events']['unknown_post']} {o['signal']} events for posts not in "
                      f"POSTS, left out")
        if name == "labelled":
            sides = dict(db.rows("SELECT side, count(*) FROM labelled GROUP BY side"))
            report["labelled"] = {s: int(sides.get(s, 0)) for s in ("pos", "neg", "between", "unexposed")}
            if not sides.get("pos"):
                raise InputError(f"no pair: no post has a signal of --min_positive {o['min_positive']} or more "
                                 f"(--signal {o['signal']}, --window)")
            if not sides.get("neg"):
                raise InputError(f"no pair: no post is a negative (--max_negative {o['max_negative']}"
                                 f"{', --min_views %s' % o['min_views'] if sides.get('unexposed') else ''})")
        if name == "candidates":
            n_strata, in_strata = db.rows("""SELECT count(DISTINCT l.stratum), count(*) FROM labelled l
                                             JOIN strata s ON l.stratum = s.stratum
                                             WHERE l.side IN ('pos', 'neg')""")[0]
            report["strata"] = {"with_both_sides": int(n_strata), "posts_without_the_other_side":
                                report["labelled"]["pos"] + report["labelled"]["neg"] - int(in_strata)}
            report["pairs"] = {"candidates": db.rows("SELECT count(*) FROM candidates")[0][0]}
            if not report["pairs"]["candidates"]:
                raise InputError(f"no pair: no stratum holds both a positive and a negative "
                                 f"(--pair_within {pair_within})")
        if name == "creator_capped":
            capped, creator_capped = (db.rows(f"SELECT count(*) FROM {t}")[0][0] for t in ("capped", "creator_capped"))
            report["pairs"].update({"stratum_cap": report["pairs"]["candidates"] - capped,
                                    "creator_cap": capped - creator_capped})
            if o["image_keys"]:
                images = [r[0] for r in db.rows("SELECT DISTINCT image FROM raw_posts WHERE post IN (SELECT pos_post "
                                                "FROM creator_capped UNION SELECT neg_post FROM creator_capped)")]
                keys, bad = _image_keys(images, skip_bad_images)
                db.load("image_keys", keys)
                report["bad_images"] = bad
    fates = dict(db.rows("SELECT fate, count(*) FROM pairs GROUP BY fate"))
    report["pairs"].update({f: int(fates.get(f, 0)) for f in ("bad_image", "creator_conflict", "image_conflict",
                                                               "train", "test")})
    if not fates.get("train") and not fates.get("test"):
        culprit = "--skip_bad_images" if fates.get("bad_image") else f"--split {o['split']}"
        raise InputError(f"no pair: {culprit} left none")
    report["per_creator"] = _per_creator(db)
    report["confound"] = _confound(db, "views" in columns)
    return report


def _per_creator(db):
    counts = [n for (n,) in db.rows("SELECT count(*) AS n FROM pairs WHERE fate IN ('train', 'test') "
                                    "GROUP BY pos_creator ORDER BY n DESC")]
    top = max(1, len(counts) // 100)
    return {"creators": len(counts), "max": counts[0], "top_1pct_share": sum(counts[:top]) / sum(counts)}


def _confound(db, with_views):
    """How often the positive's creator has more posts (or views) than the negative's: over every positive and
    negative of the community (raw), and over the kept pairs (within strata)."""
    db.create("creators", f"SELECT creator, count(*) AS posts, {'sum(views)' if with_views else 'NULL'} AS views "
                          f"FROM posts GROUP BY creator")
    result = {}
    for measure in ("posts",) + (("views",) if with_views else ()):
        # per distinct value: positives, and negatives strictly below it (every pos x neg pair, never enumerated)
        raw = db.rows(f"""
            SELECT sum(n_pos * neg_below) / (sum(n_pos) * sum(n_neg)) FROM (
                SELECT n_pos, n_neg, coalesce(sum(n_neg) OVER (ORDER BY v ROWS BETWEEN UNBOUNDED PRECEDING
                                                                         AND 1 PRECEDING), 0) AS neg_below
                FROM (SELECT c.{measure} AS v, count(CASE WHEN l.side = 'pos' THEN 1 END) AS n_pos,
                             count(CASE WHEN l.side = 'neg' THEN 1 END) AS n_neg
                      FROM labelled l JOIN creators c ON l.creator = c.creator
                      WHERE l.side IN ('pos', 'neg') GROUP BY c.{measure}) AS per_value) AS cumulative""")[0][0]
        within = db.rows(f"""
            SELECT avg(CASE WHEN cp.{measure} > cn.{measure} THEN 1.0 ELSE 0.0 END) FROM pairs p
            JOIN creators cp ON p.pos_creator = cp.creator JOIN creators cn ON p.neg_creator = cn.creator
            WHERE p.fate IN ('train', 'test')""")[0][0]
        result[f"pos_creator_more_{measure}"] = {"raw": float(raw), "within_strata": float(within)}
    return result


def _write_pickapic(db, folder):
    """Pick-a-Pic's layout (caption, jpg_0, jpg_1 as bytes, label_0, label_1, and the columns PickScore's trainer
    reads), the preferred image placed first or second by the pair's hash; streamed, a shard's rows at a time."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    os.makedirs(os.path.join(folder, "pickapic"))
    for name in ("train", "test"):
        index = os.path.join(folder, f".{name}-pickapic.parquet")
        db.write_parquet(split_query(name, ["pos_first", "count(*) OVER (PARTITION BY prompt) AS per_prompt"]), index)
        shards = pq.ParquetFile(index)
        n_shards = max(1, -(-shards.metadata.num_rows // PICKAPIC_ROWS_PER_SHARD))
        batches = shards.iter_batches(PICKAPIC_ROWS_PER_SHARD) if shards.metadata.num_rows else [
            shards.schema_arrow.empty_table()]  # a split without pairs still gets its shard, empty
        for shard, rows in enumerate(batches):
            first = rows["pos_first"]
            path_0, path_1 = (pc.if_else(first, rows[a], rows[b]).to_pylist()
                              for a, b in (("pos_path", "neg_path"), ("neg_path", "pos_path")))
            uid_0, uid_1 = (pc.cast(pc.if_else(first, rows[a], rows[b]), pa.string())
                            for a, b in (("pos_post", "neg_post"), ("neg_post", "pos_post")))
            label_0 = pc.cast(first, pa.float64())
            table = pa.table({
                "caption": rows["prompt"],
                "jpg_0": pa.array([_bytes(p) for p in path_0], pa.binary()),
                "jpg_1": pa.array([_bytes(p) for p in path_1], pa.binary()),
                "label_0": label_0, "label_1": pc.subtract(1.0, label_0),
                "image_0_uid": uid_0, "image_1_uid": uid_1,
                "best_image_uid": pc.cast(rows["pos_post"], pa.string()),
                "are_different": pa.array([True] * len(rows), pa.bool_()),
                "has_label": pa.array([True] * len(rows), pa.bool_()),
                "num_example_per_prompt": pc.cast(rows["per_prompt"], pa.int64()),
                "stratum": pc.cast(rows["stratum"], pa.string())})
            pq.write_table(table, os.path.join(folder, "pickapic", f"{name}-{shard:05d}-of-{n_shards:05d}.parquet"))
        shards.close()
        os.remove(index)


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def report_markdown(report):
    """The report's key lines: the rows at each step and what each filter removed."""
    lines = [f"# Pairs from {report['posts']} posts (--pair_within {report['options']['pair_within']})", ""]
    if "events" in report:
        e = report["events"]
        lines += [f"- events: {e['rows']} rows; {e['signal_events']} of --signal {report['options']['signal']}: "
                  f"{e['self']} self, {e['late']} late, {e['before_post']} before the post, {e['repeats']} repeats, "
                  f"{e['unknown_post']} for unknown posts removed; {e['counted_users']} (post, user) counted"]
    lab, strata, pairs = report["labelled"], report["strata"], report["pairs"]
    lines += [f"- posts: {lab['pos']} positive, {lab['neg']} negative, {lab['between']} between, "
              f"{lab['unexposed']} unexposed (below --min_views)",
              f"- strata with both sides: {strata['with_both_sides']}; {strata['posts_without_the_other_side']} "
              f"labelled posts in strata without both sides",
              f"- pairs: {pairs['candidates']} candidates, {pairs['stratum_cap']} over --max_pairs_per_stratum, "
              f"{pairs['creator_cap']} over --max_pairs_per_creator, {pairs['creator_conflict']} creator and "
              f"{pairs['image_conflict']} image split conflicts, {pairs['bad_image']} with bad images",
              f"- kept: {pairs['train']} train, {pairs['test']} test",
              f"- per creator: {report['per_creator']['creators']} creators, at most {report['per_creator']['max']} "
              f"pairs, the top 1% hold {report['per_creator']['top_1pct_share'] * 100:.1f}%"]
    for name, share in report["confound"].items():
        lines.append(f"- {name.replace('_', ' ')}: {share['raw'] * 100:.1f}% raw, "
                     f"{share['within_strata'] * 100:.1f}% within strata")
    return "\n".join(lines) + "\n"
