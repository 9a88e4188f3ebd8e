"""The whole job offline on a CPU in a few minutes: a synthetic community's posts and remix logs, mined into pairs by
scripts/social_pairs.py, a tiny CLIP from random init, accuracy before/after, compare.py's table and picture of the
model before and after fine-tuning, then the reward applied to generators: best of N candidates before and after,
and evaluate_generators.py ranking two synthetic generators.

    python demo.py                      # writes ./demo_out: the community, its pairs, checkpoints

Each post of the community draws what its prompt says ("two red circles") or not (its hidden quality); remixes come
from views, and views from the creator's audience, so raw popularity mostly measures the creator. The miner compares
only images of one request and counts distinct other users' remixes within a week. A random CLIP scores the pairs at
chance; fine-tuning with train_pair_pos_neg.py through `accelerate launch` teaches it colours, shapes and counts. A
synthetic "generator" draws what its prompt says only sometimes (the world knows when), so the share of kept images
that draw their prompt measures the reward.
"""
import argparse
import os
import subprocess
import sys

from social_reward.cli import run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_CLIP = os.path.join(HERE, "assets", "tiny-clip.json")


def enhancement_demo(out, rewards, n_prompts=40, n=8, follow_rate=0.25):
    """Best of `n` under each reward ({name: spec}): the share of kept images that draw their prompt, and a picture
    of each reward's pick for four prompts; returns {name: share}."""
    from social_reward.scoring.best_of_n import best_of_n
    from social_reward.scoring.pictures import comparison_picture
    from social_reward.synthetic.generations import make_generations

    candidates = make_generations(os.path.join(out, "candidates"), "candidates", n_prompts, n, follow_rate, seed=7)
    shares, picks = {}, {}
    for name, spec in rewards.items():
        kept = best_of_n(candidates, spec, top_k=1, out=os.path.join(out, f"best_of_{n}_{name}"), device="cpu",
                         num_workers=0, overwrite=True)["rows"]
        follows = candidates.set_index("image").follows
        shares[name] = follows[kept.image].mean()
        picks[name] = dict(zip(kept.prompt, zip(kept.image, kept.score)))
    prompts = list(picks[next(iter(rewards))])[:4]
    comparison_picture([(p, {name: picks[name][p] for name in rewards}) for p in prompts],
                       os.path.join(out, f"best_of_{n}.png"))
    return shares


def run_demo(out="demo_out", n_train=1200, n_val=300, n_epochs=5, batch_size=32, learning_rate=5e-4, seed=0):
    """A synthetic community's logs, mined into pairs; a random init validated, fine-tuned through `accelerate
    launch`, validated again, compared, and applied to generators."""
    import pandas as pd
    import torch

    from social_reward.mining.pairs import report_markdown, social_pairs
    from social_reward.models.clip import load_model
    from social_reward.scoring.comparison import compare, markdown_table
    from social_reward.scoring.leaderboard import evaluate_generators, leaderboard_markdown
    from social_reward.scoring.validation import validate_image_pair_classifier
    from social_reward.synthetic.community import agreement, make_community, popularity_pairs
    from social_reward.synthetic.generations import make_generations

    posts, events = make_community(os.path.join(out, "community", "images"), n_creators=int(n_train * 0.65),
                                   seed=seed)
    posts_file, events_file = os.path.join(out, "community", "posts.parquet"), os.path.join(out, "community", "events.parquet")
    posts.drop(columns="follows").to_parquet(posts_file)  # the hidden quality stays hidden
    events.to_parquet(events_file)
    pairs = os.path.join(out, "pairs")
    report = social_pairs(posts_file, events_file, out=pairs, test_fraction=n_val / (n_train + n_val), overwrite=True)
    lines = report_markdown(report).splitlines()
    print(f"community: {len(posts)} posts, {len(events)} events ({posts_file}, {events_file})")
    print("\n".join(line for line in lines if line.startswith(("- events", "- kept", "- pos creator"))))
    train_file, val_file = os.path.join(pairs, "train.parquet"), os.path.join(pairs, "test.parquet")
    mined = pd.concat([pd.read_parquet(train_file), pd.read_parquet(val_file)])
    print(f"pairs that agree with the hidden quality: {agreement(mined, posts)[0] * 100:.0f}% mined, "
          f"{agreement(popularity_pairs(posts, events, seed=seed), posts)[0] * 100:.0f}% by raw popularity")

    torch.manual_seed(seed)
    init = os.path.join(out, "random_init.pth")
    torch.save(load_model(TINY_CLIP, pretrained="none")[0].state_dict(), init)
    before = validate_image_pair_classifier(val_file, init, "cpu", num_workers=0, model=TINY_CLIP)
    print(f"before fine-tuning: Accuracy: {before * 100:.2f}%")

    save_folder = os.path.join(out, "clip_finetune")
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "train_pair_pos_neg.py", "--training_file", train_file, "--training_mode", "all",
                    "--batch_size", str(batch_size), "--n_epochs", str(n_epochs), "--save_folder", save_folder,
                    "--model", TINY_CLIP, "--checkout_path", init, "--learning_rate", str(learning_rate),
                    "--seed", str(seed)],
                   check=True, cwd=HERE)
    final = os.path.join(save_folder, f"clip_epoch_{n_epochs - 1}_global_step_final.pth")
    after = validate_image_pair_classifier(val_file, final, "cpu", num_workers=0, model=TINY_CLIP)
    # the two models side by side, as compare.py puts any reward models: the table and what each picks per prompt
    comparison = os.path.join(out, "comparison")
    table = compare([val_file], {"before": f"clip:{init},model={TINY_CLIP}", "after": f"clip:{final},model={TINY_CLIP}"},
                    out=comparison, prompts=4, device="cpu", num_workers=0)
    print(markdown_table(table), end="")
    print(f"what each model picks for four prompts: {os.path.join(comparison, 'comparison.png')}")
    # the reward applied to generators: keep the best of 8 candidates, and rank two generators
    rewards = {"before": f"clip:{init},model={TINY_CLIP}", "after": f"clip:{final},model={TINY_CLIP}"}
    shares = enhancement_demo(out, rewards)
    generations = pd.concat([make_generations(os.path.join(out, "generators", name), name, 30, 2, rate, seed)
                             for name, rate, seed in (("follows-30%", 0.3, 11), ("follows-80%", 0.8, 12))])
    board, rates = evaluate_generators([generations.drop(columns="follows")], {"after": rewards["after"]},
                                       os.path.join(out, "generators_eval"), device="cpu", num_workers=0,
                                       overwrite=True)
    print(leaderboard_markdown(board), end="")
    win = rates[rates.generator == "follows-80%"].iloc[0]
    print(f"before fine-tuning: Accuracy: {before * 100:.2f}%   (on the mined test pairs: {val_file})")
    print(f"after fine-tuning:  Accuracy: {after * 100:.2f}%   ({final})")
    print(f"best of 8: {shares['before'] * 100:.0f}% -> {shares['after'] * 100:.0f}% draw their prompt   "
          f"(each candidate does with probability 25%; picks: {os.path.join(out, 'best_of_8.png')})")
    print(f"generators under the fine-tuned reward: follows-80% wins {win.win_rate * 100:.1f}% of {win['items']} "
          f"items over follows-30%")
    return {"before": before, "after": after, "best_of_8": shares, "win_rate": win.win_rate}



def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--n_epochs", type=int, default=5)
    args = parser.parse_args()
    run_demo(os.path.abspath(args.out), n_epochs=args.n_epochs)


if __name__ == "__main__":
    run_cli(main)
