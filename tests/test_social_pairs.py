import hashlib
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from conftest import MICRO_CLIP, ROOT, require_extra

from social_reward.errors import InputError
from social_reward.synthetic.community import agreement, make_community, popularity_pairs
from social_reward.synthetic.shapes import make_pairs
from social_reward.mining.pairs import social_pairs
from social_reward.mining.engines import check_java
from train_pair_pos_neg import finetune_model
from validate import validate_image_pair_classifier

require_extra('mine', 'duckdb', 'sqlglot')

T0 = pd.Timestamp("2026-01-01")


@pytest.fixture(scope="module")
def community():
    """Logs of 120 creators (no image files): about 1,200 posts and 130,000 events."""
    posts, events = make_community(None, n_creators=120, seed=1)
    return posts.drop(columns="follows"), events


@pytest.fixture(scope="module")
def spark():
    """One local Spark session for the module: social_pairs' SparkEngine finds it with getOrCreate. A core (an xdist
    worker's share), and the JVM's quick compiler only: a run this small ends before the optimising one pays off
    (the session and the first mining run in 35 s instead of 60 here)."""
    pytest.importorskip("pyspark", reason="needs the mine extra: pip install -e '.[mine]'")
    if shutil.which("java") is None:
        pytest.skip("Spark needs a Java runtime: apt-get install openjdk-17-jre-headless (.ci/run installs it)")
    from pyspark.sql import SparkSession
    session = (SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
               .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1").getOrCreate())
    yield session
    session.stop()


def read_pairs(out):
    return pd.read_parquet(os.path.join(out, "train.parquet")), pd.read_parquet(os.path.join(out, "test.parquet"))


def expected_signal(posts, events, kind="remix", window=pd.Timedelta("7D")):
    """The rule in pandas, written from its words: distinct users other than the creator, inside the window."""
    e = events[events.kind == kind].merge(posts[["post", "creator", "posted_at"]], on="post")
    e = e[(e.user != e.creator) & (e["at"] >= e.posted_at) & (e["at"] < e.posted_at + window)]
    return e.groupby("post").user.nunique().reindex(posts.post, fill_value=0)


def test_every_pair_obeys_the_rule_and_no_pair_of_the_rule_is_missing_without_caps(community, tmp_path):
    posts, events = community
    report = social_pairs(posts, events, out=str(tmp_path / "out"), max_pairs_per_stratum=10_000)
    train, test = read_pairs(tmp_path / "out")
    signal = expected_signal(posts, events)
    labelled = posts.assign(signal=signal.values)
    pos, neg = labelled[labelled.signal >= 1], labelled[labelled.signal == 0]
    expected = {(p, n) for p, n in pos.merge(neg, on="group")[["post_x", "post_y"]].itertuples(index=False)}
    mined = pd.concat([train, test])
    assert set(zip(mined.pos_post, mined.neg_post)) == expected and len(mined) == len(expected)
    assert (mined.pos_signal.values == signal[mined.pos_post].values).all()
    assert (mined.neg_signal == 0).all()
    assert (mined.prompt.values == posts.set_index("post").prompt[mined.pos_post].values).all()
    assert report["pairs"]["train"] == len(train) and report["pairs"]["test"] == len(test) > 0


def test_self_late_repeated_and_early_events_do_not_count(tmp_path):
    posts = pd.DataFrame({"post": [1, 2], "image": ["a.png", "b.png"], "prompt": ["p", "p"],
                          "creator": ["c", "c"], "posted_at": [T0, T0], "group": [0, 0]})
    events = pd.DataFrame({"post": [1, 1, 1, 2, 2, 2, 2], "user": ["u1", "u1", "u2", "c", "u3", "u4", "u5"],
                           "kind": ["remix", "remix", "like", "remix", "remix", "remix", "save"],
                           "at": [T0 + pd.Timedelta(h, "h") for h in (1, 2, 3, 1, 7 * 24, -1, 5)]})
    report = social_pairs(posts, events, out=str(tmp_path / "out"), test_fraction=0)
    train, _ = read_pairs(tmp_path / "out")
    # post 1: u1 twice counts once; post 2: its creator, a remix at exactly 7 days and one before the post do not
    assert train[["pos_post", "neg_post", "pos_signal", "neg_signal"]].values.tolist() == [[1, 2, 1, 0]]
    assert {k: report["events"][k] for k in ("self", "late", "before_post", "repeats")} == \
        {"self": 1, "late": 1, "before_post": 1, "repeats": 1}


def test_a_creator_and_a_user_of_other_types_are_compared_as_text(tmp_path):
    # creators as integers in POSTS, users as strings in EVENTS (as two exports of one platform may write them)
    posts = pd.DataFrame({"post": [1, 2], "image": ["a.png", "b.png"], "prompt": ["p", "p"],
                          "creator": [7, 7], "posted_at": [T0, T0], "group": [0, 0]})
    events = pd.DataFrame({"post": [1, 2, 2], "user": ["8", "7", "7"], "kind": ["remix"] * 3,
                           "at": [T0 + pd.Timedelta(1, "h")] * 3})
    report = social_pairs(posts, events, out=str(tmp_path / "out"), test_fraction=0)
    train, _ = read_pairs(tmp_path / "out")
    assert train[["pos_post", "neg_post"]].values.tolist() == [[1, 2]] and report["events"]["self"] == 2


def test_kept_pairs_of_a_stratum_are_the_first_by_md5_of_seed_and_post_ids(community, tmp_path):
    posts, events = community
    social_pairs(posts, events, out=str(tmp_path / "out"), max_pairs_per_stratum=2, seed=7, test_fraction=0)
    capped, _ = read_pairs(tmp_path / "out")
    social_pairs(posts, events, out=str(tmp_path / "all"), max_pairs_per_stratum=10_000, seed=7, test_fraction=0)
    every, _ = read_pairs(tmp_path / "all")
    every["hash"] = [hashlib.md5(f"7/{p}/{n}".encode()).hexdigest() for p, n in zip(every.pos_post, every.neg_post)]
    first = every.sort_values("hash").groupby("stratum").head(2)
    assert set(zip(capped.pos_post, capped.neg_post)) == set(zip(first.pos_post, first.neg_post))
    assert capped.groupby("stratum").size().max() == 2 and len(capped) < len(every)


def test_no_creator_and_no_image_is_in_two_splits(community, tmp_path):
    posts, events = community
    posts = posts.copy()
    posts.loc[posts.index[::7], "image"] = "reposted.png"  # one image under many posts, of many creators
    report = social_pairs(posts, events, out=str(tmp_path / "out"), pair_within="prompt", test_fraction=0.3,
                          max_pairs_per_creator=40)
    train, test = read_pairs(tmp_path / "out")
    assert not (set(train.pos_creator) | set(train.neg_creator)) & (set(test.pos_creator) | set(test.neg_creator))
    assert not (set(train.pos_path) | set(train.neg_path)) & (set(test.pos_path) | set(test.neg_path))
    assert report["pairs"]["creator_conflict"] > 0 and len(test) > 0
    assert train.groupby("pos_creator").size().max() <= 40


def test_duckdb_and_spark_write_the_same_pairs_and_report(community, spark, tmp_path):
    posts, events = community
    posts = posts.drop(columns="group")  # creator_day strata; both a creator cap and split conflicts at work
    kwargs = dict(max_pairs_per_stratum=3, max_pairs_per_creator=6, seed=3, test_fraction=0.2)
    duck = social_pairs(posts, events, out=str(tmp_path / "duckdb"), **kwargs)
    spark_report = social_pairs(posts, events, out=str(tmp_path / "spark"), engine="spark", **kwargs)
    for name in ("train", "test"):
        ours, theirs = (pd.read_parquet(tmp_path / e / f"{name}.parquet") for e in ("duckdb", "spark"))
        pd.testing.assert_frame_equal(ours, theirs)
    assert duck == spark_report and duck["pairs"]["creator_cap"] > 0
    assert (tmp_path / "duckdb" / "report.md").read_text() == (tmp_path / "spark" / "report.md").read_text()


def test_pickapic_layout_loads_with_datasets_as_diffusion_dpo_reads_it(tmp_path):
    import datasets
    posts, events = make_community(str(tmp_path / "images"), n_creators=20, seed=2)
    social_pairs(posts, events, out=str(tmp_path / "out"), layout="pickapic", test_fraction=0.3)
    train, _ = read_pairs(tmp_path / "out")
    loaded = datasets.load_dataset(str(tmp_path / "out" / "pickapic"), split="train")
    assert len(loaded) == len(train) and {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label",
                                          "are_different", "num_example_per_prompt"} <= set(loaded.column_names)
    assert len(datasets.load_dataset(str(tmp_path / "out" / "pickapic"), split="test")) > 0
    for row, pair in zip(loaded.select(range(5)), train.itertuples()):
        preferred = row["jpg_0"] if row["label_0"] == 1 else row["jpg_1"]  # diffusers swaps when label_0 == 0
        assert preferred == open(pair.pos_path, "rb").read() and row["label_0"] + row["label_1"] == 1
        assert row["caption"] == pair.prompt
    assert 0 < sum(loaded["label_0"]) < len(loaded)  # the preferred image on both sides


def test_pickapic_shards_are_written_a_shard_at_a_time_in_the_pairs_order(tmp_path, monkeypatch):
    from social_reward.mining import pairs as module
    monkeypatch.setattr(module, "PICKAPIC_ROWS_PER_SHARD", 7)
    posts, events = make_community(str(tmp_path / "images"), n_creators=20, seed=2)
    social_pairs(posts, events, out=str(tmp_path / "out"), layout="pickapic", test_fraction=0.3)
    for name, pairs in zip(("train", "test"), read_pairs(tmp_path / "out")):
        shards = sorted((tmp_path / "out" / "pickapic").glob(f"{name}-*.parquet"))
        assert len(shards) == -(-len(pairs) // 7) > 1 and shards[-1].name.endswith(f"-of-{len(shards):05d}.parquet")
        rows = pd.concat([pd.read_parquet(shard) for shard in shards], ignore_index=True)
        pos_first = rows.label_0 == 1
        assert (rows.best_image_uid == pairs.pos_post.astype(str)).all()
        assert (rows.image_0_uid.where(pos_first, rows.image_1_uid) == pairs.pos_post.astype(str)).all()
        assert (rows.caption == pairs.prompt).all() and (rows.stratum == pairs.stratum).all()
        assert (rows.num_example_per_prompt == pairs.groupby("prompt").prompt.transform("size")).all()


def test_duckdb_takes_its_memory_limit_and_threads_from_the_machine_unless_told(monkeypatch):
    from social_reward.mining import engines
    from social_reward.mining.engines import DuckDBEngine
    from social_reward.mining.machine import machine_memory_limit, machine_threads

    def settings(engine):
        return engine.rows("SELECT current_setting('memory_limit'), current_setting('threads')")[0]
    import duckdb
    duckdb_default = duckdb.connect().execute("SELECT current_setting('memory_limit')").fetchone()[0]  # 80% of RAM
    monkeypatch.setattr(engines, "machine_threads", lambda: 3)  # as a machine of 3 cores
    limit, threads = settings(DuckDBEngine())
    assert threads == 3 and limit == settings(DuckDBEngine(memory_limit=machine_memory_limit(3)))[0] != duckdb_default
    assert settings(DuckDBEngine(memory_limit="300MB", threads=1)) == (settings(DuckDBEngine(memory_limit="300MB"))[0], 1)
    assert 1 <= machine_threads() <= os.cpu_count()


@pytest.mark.parametrize("files, threads, memory", [
    ({}, 8, 8 * 512),  # no cgroup files: the cores and the per-thread share
    ({"cpu.max": "200000 100000\n", "memory.max": "1073741824\n"}, 2, 256),  # v2: 2 cores, a quarter of 1 GB
    ({"cpu.max": "max 100000\n", "memory.max": "max\n"}, 8, 8 * 512),
    ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n",
      "memory/memory.limit_in_bytes": "2147483648\n"}, 1, 512),  # v1: 1.5 cores round down, a quarter of 2 GB
    ({"cpu/cpu.cfs_quota_us": "-1\n", "memory/memory.limit_in_bytes": "9223372036854771712\n"}, 8, 8 * 512),
])
def test_the_machines_threads_and_memory_come_from_its_cgroup_v2_or_v1(files, threads, memory, tmp_path, monkeypatch):
    from social_reward.mining import machine
    for name, text in files.items():
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(machine, "CGROUP", str(tmp_path))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "sysconf", {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 64 * 2**30 // 4096}.__getitem__)
    assert machine.machine_threads() == threads
    assert machine.machine_memory_limit(machine.machine_threads()) == f"{memory}MB"


def test_mined_pairs_agree_with_hidden_quality_and_train_a_better_reward_than_popularity_pairs(tmp_path, one_thread,
                                                                                               micro_init):
    posts, events = make_community(str(tmp_path / "images"), n_creators=150, seed=0)
    social_pairs(posts.drop(columns="follows"), events, out=str(tmp_path / "out"), test_fraction=0)
    mined, _ = read_pairs(tmp_path / "out")
    popular = popularity_pairs(posts, events, seed=0)
    assert agreement(mined, posts)[0] > agreement(popular, posts)[0] + 0.15
    held_out = make_pairs(str(tmp_path / "held_out"), 200, seed=5)  # the preferred image draws the prompt
    n = min(len(mined), len(popular), 160)
    accuracy = {}
    for name, pairs in (("mined", mined.sample(n=n, random_state=0)), ("popular", popular.iloc[:n])):
        pairs.to_parquet(tmp_path / f"{name}.parquet")  # read as train_pair_pos_neg.py reads --training_file
        final = finetune_model(str(tmp_path / f"{name}.parquet"), "all", batch_size=16, n_epochs=2,
                               save_folder=str(tmp_path / name), checkout_path=micro_init, learning_rate=5e-4,
                               model=MICRO_CLIP, num_workers=0)
        accuracy[name] = validate_image_pair_classifier(held_out, final, "cpu", num_workers=0, model=MICRO_CLIP)
    assert accuracy["mined"] > accuracy["popular"] + 0.05, accuracy


def assert_refused(tmp_path, message, posts, events=None, **kwargs):
    out = tmp_path / "refused"
    with pytest.raises(InputError, match=message):
        social_pairs(posts, events, out=str(out), **kwargs)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".refused")]


def test_bad_inputs_are_named_in_one_line_and_leave_no_out(community, tmp_path):
    posts, events = community
    assert_refused(tmp_path, r"POSTS \(DataFrame\): missing column 'creator' \(found: post, image, prompt, "
                   r"posted_at", posts.drop(columns="creator"), events)
    assert_refused(tmp_path, "post 5 appears more than once", pd.concat([posts, posts[posts.post == 5]]), events)
    bad_time = posts.astype({"posted_at": str}).copy()
    bad_time.loc[3, "posted_at"] = "yesterday"
    assert_refused(tmp_path, "post 3: posted_at 'yesterday' is not a timestamp", bad_time, events)
    bad_at = events.astype({"at": str}).copy()
    row = bad_at.index[bad_at.kind == "remix"][0]
    bad_at.loc[row, "at"] = "soon"
    assert_refused(tmp_path, f"EVENTS \\(DataFrame\\): post {bad_at.post[row]}: at 'soon' is not a timestamp",
                   posts, bad_at)
    assert_refused(tmp_path, r"--signal repost: no such kind in EVENTS \(DataFrame\) \(kinds present: like, remix, "
                   r"save\)", posts, events, signal="repost")
    assert_refused(tmp_path, "no pair: no post has a signal of --min_positive 100000", posts, events,
                   min_positive=100_000)
    assert_refused(tmp_path, "no pair: no post is a negative .*--min_views 10000000", posts.assign(views=5), events,
                   min_views=10_000_000)
    assert_refused(tmp_path, "no pair: no stratum holds both a positive and a negative \\(--pair_within creator",
                   posts.assign(creator=posts.post), events, pair_within="creator")


def test_events_for_unknown_posts_are_counted_and_left_out(community, tmp_path, capsys):
    posts, events = community
    strays = events.iloc[:5].assign(post=-1, kind="remix")
    report = social_pairs(posts, pd.concat([events, strays]), out=str(tmp_path / "out"))
    assert report["events"]["unknown_post"] == 5
    assert "EVENTS (DataFrame): 5 remix events for posts not in POSTS, left out" in capsys.readouterr().out


def test_an_out_holding_other_files_is_refused_unless_overwrite(community, tmp_path):
    posts, events = community
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds other files \\(notes.txt\\); pass --overwrite"):
        social_pairs(posts, events, out=str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["notes.txt"]
    social_pairs(posts, events, out=str(tmp_path / "out"), overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["report.json", "report.md", "test.parquet", "train.parquet"]


def test_check_images_names_images_that_do_not_open_and_skip_bad_images_leaves_their_pairs_out(tmp_path):
    posts, events = make_community(str(tmp_path / "images"), n_creators=12, seed=3)
    social_pairs(posts, events, out=str(tmp_path / "all"), test_fraction=0)
    every, _ = read_pairs(tmp_path / "all")
    broken = every.pos_path.iloc[0]
    with open(broken, "wb") as f:
        f.write(b"not a png")
    assert_refused(tmp_path, f"--check_images: 1 image\\(s\\) do not open: {broken}; pass --skip_bad_images",
                   posts, events, check_images=True)
    report = social_pairs(posts, events, out=str(tmp_path / "out"), check_images=True, skip_bad_images=True,
                          test_fraction=0)
    kept, _ = read_pairs(tmp_path / "out")
    assert broken not in set(kept.pos_path) | set(kept.neg_path)
    assert report["pairs"]["bad_image"] == (every.pos_path == broken).sum() + (every.neg_path == broken).sum()


def test_check_images_treats_one_content_under_two_paths_as_one_image(tmp_path):
    posts, events = make_community(str(tmp_path / "images"), n_creators=40, seed=4)
    social_pairs(posts, events, out=str(tmp_path / "plain"), test_fraction=0.5)
    train, test = read_pairs(tmp_path / "plain")
    copy = str(tmp_path / "images" / "copy.png")
    with open(train.pos_path.iloc[0], "rb") as f, open(copy, "wb") as g:
        g.write(f.read())
    posts.loc[posts.image == test.pos_path.iloc[0], "image"] = copy  # a test image, now the same as a train one
    social_pairs(posts, events, out=str(tmp_path / "checked"), test_fraction=0.5, check_images=True)
    _, checked_test = read_pairs(tmp_path / "checked")
    assert copy not in set(checked_test.pos_path) | set(checked_test.neg_path)


def test_one_image_of_two_posts_a_creator_of_none_and_a_column_named_like_a_step_change_no_pair(tmp_path):
    from PIL import Image
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), name[0] == "a" and "red" or "blue").save(tmp_path / name)
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    # posts 1 and 3 share a.png; post 2's creator is unknown; pair_time is also a column of POSTS
    posts = pd.DataFrame({"post": [1, 2, 3], "image": [a, b, a], "prompt": ["p"] * 3,
                          "creator": pd.array([7, None, 8], dtype="Int64"), "posted_at": [T0] * 3, "group": [0] * 3,
                          "pair_time": [0, 0, 0]})
    events = pd.DataFrame({"post": [1], "user": [9], "kind": ["remix"], "at": [T0 + pd.Timedelta(1, "h")]})
    for kwargs in ({"check_images": True}, {}, {"split": "time", "test_after": "2027-01-01"}):
        out = tmp_path / f"out{len(os.listdir(tmp_path))}"
        report = social_pairs(posts, events, out=str(out), test_fraction=0, **kwargs)
        train, _ = read_pairs(out)
        assert train[["pos_post", "neg_post"]].values.tolist() == [[1, 2], [1, 3]], kwargs
        assert report["pairs"]["candidates"] == report["pairs"]["train"] == 2


def test_a_post_without_an_id_is_refused(tmp_path):
    posts = pd.DataFrame({"post": pd.array([1, None], dtype="Int64"), "image": ["a.png", "b.png"], "prompt": ["p"] * 2,
                          "creator": ["c", "d"], "posted_at": [T0] * 2, "remixes": [1, 0]})
    assert_refused(tmp_path, r"POSTS \(DataFrame\): 1 row\(s\) without a post id", posts, signal="remixes")


def test_spark_without_java_says_so_in_one_line(monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(InputError, match="--engine spark: no Java runtime found"):
        check_java()


def test_the_command_line_prints_the_report(community, tmp_path):
    posts, events = community
    posts.to_csv(tmp_path / "posts.csv", index=False)
    events.to_parquet(tmp_path / "events.parquet")
    result = subprocess.run([sys.executable, "scripts/social_pairs.py", str(tmp_path / "posts.csv"),
                             str(tmp_path / "events.parquet"), "--out", str(tmp_path / "out")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "- kept: " in result.stdout and (tmp_path / "out" / "report.json").exists()
    result = subprocess.run([sys.executable, "scripts/social_pairs.py", str(tmp_path / "posts.csv"), "--out",
                             str(tmp_path / "again")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "missing column 'remix'" in result.stderr.strip().splitlines()[-1]


def test_a_count_column_of_any_name_is_the_signal_without_events(tmp_path):
    posts = pd.DataFrame({"post": [1, 2], "image": ["a.png", "b.png"], "prompt": ["p", "p"], "creator": ["c", "c"],
                          "posted_at": [T0, T0], "group": [0, 0], "remix count": [3, 0]})
    social_pairs(posts, out=str(tmp_path / "out"), signal="remix count", test_fraction=0)
    train, _ = read_pairs(tmp_path / "out")
    assert train[["pos_post", "neg_post", "pos_signal"]].values.tolist() == [[1, 2, 3]]


def test_thresholds_that_make_a_post_both_sides_are_refused(community, tmp_path):
    posts, events = community
    with pytest.raises(InputError, match="--min_positive 0 must be above --max_negative 0"):
        social_pairs(posts, events, out=str(tmp_path / "out"), min_positive=0)
    assert not (tmp_path / "out").exists()
