"""From a community's posts and engagement events to training pairs: the "social" of Social Reward.

    python scripts/social_pairs.py posts.parquet events.parquet --out pairs/                 # DuckDB, embedded
    python scripts/social_pairs.py posts.parquet events.parquet --out pairs/ --engine spark  # the same pairs, on Spark
    python scripts/social_pairs.py posts.csv --signal remixes --out pairs/ --layout pickapic # counts already on POSTS

A post's signal is the number of distinct users other than its creator with a --signal event (default remix) in
[posted_at, posted_at + --window). Positives have at least --min_positive, negatives at most --max_negative (and,
where POSTS has views, at least --min_views exposures). Pairs are made only inside a stratum (--pair_within: the
images of one request, one creator's day, one creator, one prompt), so a popular creator's weak image is never
preferred to an unknown creator's good one for its audience alone. Writes DIR/train.parquet and DIR/test.parquet
(prompt, pos_path, neg_path and where each pair came from), DIR/report.json and report.md, and with --layout
pickapic DIR/pickapic/{train,test}-*.parquet. The rule is one query (social_reward/mining/rule.py); docs/social_pairs.md.
"""
import argparse

from social_reward.cli import run_cli
from social_reward.mining.engines import ENGINES
from social_reward.mining.rule import STRATA


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("posts", help="posts (parquet/csv, a glob): post, image, prompt, creator, posted_at[, group, views]")
    parser.add_argument("events", nargs="?", default=None, help="events (parquet/csv, a glob): post, user, kind, at")
    parser.add_argument("--out", required=True)
    parser.add_argument("--signal", default="remix", help="the event kind counted (without EVENTS: a POSTS column)")
    parser.add_argument("--window", default="7d", help="events count in [posted_at, posted_at + window): 30m, 12h, 7d")
    parser.add_argument("--min_positive", type=int, default=1)
    parser.add_argument("--max_negative", type=int, default=0)
    parser.add_argument("--min_views", type=int, default=0, help="a negative needs this many exposures (POSTS.views)")
    parser.add_argument("--pair_within", default=None, choices=list(STRATA),
                        help="the stratum pairs are made in (default: group when POSTS has it, else creator_day)")
    parser.add_argument("--max_pairs_per_stratum", type=int, default=16)
    parser.add_argument("--max_pairs_per_creator", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="the hash that picks kept pairs, splits and sides")
    parser.add_argument("--split", default="creator", choices=["creator", "time"])
    parser.add_argument("--test_after", default=None, help="with --split time: pairs whose later post is at or "
                                                           "after this time are test pairs")
    parser.add_argument("--test_fraction", type=float, default=0.1, help="with --split creator")
    parser.add_argument("--check_images", action="store_true", help="check every image opens; one image by content")
    parser.add_argument("--skip_bad_images", action="store_true")
    parser.add_argument("--layout", default="table", choices=["table", "pickapic"])
    parser.add_argument("--engine", default="duckdb", choices=list(ENGINES))
    parser.add_argument("--memory_limit", default=None, help="e.g. 2GB: DuckDB spills past it (Spark: driver memory)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    from social_reward.mining.pairs import report_markdown, social_pairs

    report = social_pairs(**vars(args))
    print(report_markdown(report), end="")


if __name__ == "__main__":
    run_cli(main, keep_freed=False)  # no model: DuckDB's and Spark's memory as the C library manages it
