"""The mining rule as one query, in DuckDB's SQL: one step a named table (a view where it only renames another), each
made from the ones above it, read the same as the rule in words; mining/engines.py runs it on DuckDB as written or
on Spark after sqlglot transpiles it, so both engines pick the same pairs and splits.

    for name, query in rule_steps(options, post_columns, event_columns):
        engine.create(name, query)

Hashes are md5 of a string (the same hex digits in both engines), compared as hex text, never as numbers: the kept
pairs of a stratum are the first by md5('SEED/POS/NEG'), a creator's split is decided by the first 8 hex digits of
md5('SEED/CREATOR'), the preferred side in the Pick-a-Pic layout by the last digit of the pair's hash.
"""


STRATA = {  # --pair_within: what two posts must share to be compared
    "group": "CAST(\"group\" AS VARCHAR)",
    "creator_day": "CAST(creator AS VARCHAR) || '/' || CAST(CAST(posted_at AS DATE) AS VARCHAR)",
    "creator": "CAST(creator AS VARCHAR)",
    "prompt": "prompt",
}


def sql_name(name):
    """A column name as an SQL identifier (quoted: `group`, `remix count`), the same in DuckDB and Spark via sqlglot."""
    return '"' + str(name).replace('"', '""') + '"'


def sql_text(value):
    return "'" + str(value).replace("'", "''") + "'"


def same_id(a, a_type, b, b_type):
    """a = b for two id columns; compared as text where their types differ (user ids as strings, creators as ints)."""
    return f"{a} = {b}" if a_type == b_type else f"CAST({a} AS VARCHAR) = CAST({b} AS VARCHAR)"


VIEW = "-- view\n"  # a step's query starting so is made a view, not a table: a copy of another step costs nothing


def rule_steps(o, post_columns, event_columns=None):
    """[(table name, DuckDB query)] in order: the rule with the options `o` (a dict of social_pairs' arguments)
    written in as literals, for POSTS holding `post_columns` and EVENTS `event_columns` ({name: type}; None without
    EVENTS). Only ids travel through the joins; prompts and paths are joined onto the kept pairs."""
    views = "views" if "views" in post_columns else "NULL"
    group = '"group"' if "group" in post_columns else "NULL"
    seed = sql_text(f"{o['seed']}/")
    steps = [("posts", f"""
        SELECT *, {STRATA[o['pair_within']]} AS stratum
        FROM (SELECT post, creator, TRY_CAST(posted_at AS TIMESTAMP) AS posted_at, {group} AS "group",
                     {views} AS views{', prompt' if o['pair_within'] == 'prompt' else ''} FROM raw_posts) AS typed""")]
    if event_columns is not None:
        self_event = same_id('e."user"', event_columns["user"], "p.creator", post_columns["creator"])
        steps += [
            # each (post, user) once per fate: what the window keeps, and what each filter removed
            ("fates", f"""
                SELECT e.post, e."user",
                       CASE WHEN e."at" IS NULL THEN 'bad_time'
                            WHEN p.post IS NULL THEN 'unknown_post'
                            WHEN {self_event} THEN 'self'
                            WHEN e."at" < p.posted_at THEN 'before_post'
                            WHEN e."at" >= p.posted_at + INTERVAL {int(o['window_seconds'])} SECOND THEN 'late'
                            ELSE 'counted' END AS fate,
                       count(*) AS events
                FROM (SELECT post, "user", TRY_CAST("at" AS TIMESTAMP) AS "at" FROM raw_events
                      WHERE kind = {sql_text(o['signal'])}) AS e
                LEFT JOIN posts p ON e.post = p.post
                GROUP BY e.post, e."user", fate"""),
            # the signal: distinct users other than the creator, with the event inside the window
            ("signals", "SELECT post, count(*) AS signal FROM fates WHERE fate = 'counted' GROUP BY post"),
        ]
    else:
        steps.append(("signals", f"SELECT post, CAST({sql_name(o['signal'])} AS BIGINT) AS signal FROM raw_posts"))
    exposed = f"(views IS NULL OR views >= {int(o['min_views'])})"
    steps += [
        ("labelled", f"""
            SELECT p.*, coalesce(s.signal, 0) AS signal,
                   CASE WHEN coalesce(s.signal, 0) >= {int(o['min_positive'])} THEN 'pos'
                        WHEN coalesce(s.signal, 0) <= {int(o['max_negative'])} AND {exposed} THEN 'neg'
                        WHEN coalesce(s.signal, 0) <= {int(o['max_negative'])} THEN 'unexposed'
                        ELSE 'between' END AS side
            FROM posts p LEFT JOIN signals s ON p.post = s.post"""),
        ("strata", """
            SELECT stratum FROM labelled WHERE stratum IS NOT NULL GROUP BY stratum
            HAVING count(CASE WHEN side = 'pos' THEN 1 END) > 0 AND count(CASE WHEN side = 'neg' THEN 1 END) > 0"""),
        # every positive with every negative of its stratum
        ("candidates", f"""
            SELECT p.stratum, p.post AS pos_post, n.post AS neg_post, p.creator AS pos_creator,
                   n.creator AS neg_creator, p.signal AS pos_signal, n.signal AS neg_signal,
                   greatest(p.posted_at, n.posted_at) AS pair_time,
                   md5({seed} || CAST(p.post AS VARCHAR) || '/' || CAST(n.post AS VARCHAR)) AS pair_hash
            FROM labelled p JOIN labelled n ON p.stratum = n.stratum
            WHERE p.side = 'pos' AND n.side = 'neg'"""),
        ("capped", f"""
            SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY stratum ORDER BY pair_hash, pos_post, neg_post)
                                     AS stratum_rank FROM candidates) AS ranked
            WHERE stratum_rank <= {int(o['max_pairs_per_stratum'])}"""),
    ]
    creator_cap = o["max_pairs_per_creator"]
    steps.append(("creator_capped", VIEW + "SELECT * FROM capped" if creator_cap is None else f"""
        SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY pos_creator ORDER BY pair_hash, pos_post, neg_post)
                                 AS creator_rank FROM capped) AS ranked
        WHERE creator_rank <= {int(creator_cap)}"""))
    if o["split"] == "creator":  # a creator's side, by hash, once per creator
        threshold = sql_text(f"{min(int(o['test_fraction'] * 16 ** 8), 16 ** 8 - 1):08x}")
        steps.append(("creator_sides", f"""
            SELECT creator, CASE WHEN substr(md5({seed} || CAST(creator AS VARCHAR)), 1, 8) < {threshold}
                                 THEN 'test' ELSE 'train' END AS side
            FROM (SELECT pos_creator AS creator FROM creator_capped UNION SELECT neg_creator FROM creator_capped)
                 AS creators"""))
        # a creator of NULL has no row that matches: its side is train, as md5(NULL) < threshold is not true
        split = ("CASE WHEN coalesce(sp.side, 'train') = coalesce(sn.side, 'train') THEN coalesce(sp.side, 'train') "
                 "ELSE 'creator_conflict' END")
        sides = ("LEFT JOIN creator_sides sp ON c.pos_creator = sp.creator "
                 "LEFT JOIN creator_sides sn ON c.neg_creator = sn.creator")
    else:
        split = f"CASE WHEN c.pair_time >= TIMESTAMP {sql_text(o['test_after'])} THEN 'test' ELSE 'train' END"
        sides = ""
    keys = o["image_keys"]  # with --check_images: a table (image, image_key, opens) social_pairs.py made
    steps.append(("assigned", f"""
        SELECT c.*, pp.prompt, pp.image AS pos_path, np.image AS neg_path,
               {split} AS split,
               {'kp.image_key' if keys else 'pp.image'} AS pos_key, {'kn.image_key' if keys else 'np.image'} AS neg_key,
               {'kp.opens AND kn.opens' if keys else 'TRUE'} AS images_open
        FROM creator_capped c JOIN raw_posts pp ON c.pos_post = pp.post JOIN raw_posts np ON c.neg_post = np.post
        {sides}
        {'JOIN image_keys kp ON pp.image = kp.image JOIN image_keys kn ON np.image = kn.image' if keys else ''}"""))
    steps += [
        ("train_images", """
            SELECT pos_key AS image_key FROM assigned WHERE split = 'train' AND images_open
            UNION SELECT neg_key FROM assigned WHERE split = 'train' AND images_open"""),
        # an image (by path, or by content with --check_images) in one split only: a test pair sharing one with
        # a training pair is dropped
        ("pairs", """
            SELECT s.*,
                   CASE WHEN NOT s.images_open THEN 'bad_image'
                        WHEN s.split = 'test' AND (tp.image_key IS NOT NULL OR tn.image_key IS NOT NULL)
                        THEN 'image_conflict' ELSE s.split END AS fate,
                   substr(s.pair_hash, 32, 1) < '8' AS pos_first
            FROM assigned s LEFT JOIN train_images tp ON s.pos_key = tp.image_key
                         LEFT JOIN train_images tn ON s.neg_key = tn.image_key"""),
    ]
    return steps


OUTPUT = ("prompt", "pos_path", "neg_path", "pos_post", "neg_post", "stratum", "pos_creator", "neg_creator",
          "pos_signal", "neg_signal")


def split_query(split, extra=()):
    """The pairs of one split in the original's layout plus where each came from, in one order for both engines."""
    return (f"SELECT {', '.join(OUTPUT + tuple(extra))} FROM pairs WHERE fate = {sql_text(split)} "
            f"ORDER BY stratum, pos_post, neg_post")
