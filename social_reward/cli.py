"""What the commands share and nothing else imports: the wrapper that turns a user's mistake into one line, and the
model flags. Importing it loads no model library, so a command's --help and flag mistakes answer at once: each
command parses its flags with these, then imports what its work needs.

    def main():
        parser = argparse.ArgumentParser(description=__doc__)
        add_model_flags(parser, inference=True)
        args = parser.parse_args()
        from social_reward.scoring.validation import evaluate_source   # the heavy part, after the flags
        ...
    if __name__ == "__main__":
        run_cli(main)
"""
import ctypes

from social_reward.devices import PRECISIONS
from social_reward.errors import InputError, one_line_errors
from social_reward.models import DEFAULT_MODEL, DEFAULT_PRETRAINED


def keep_freed_memory():
    """Have the C library keep freed memory for reuse rather than hand it back to the system (glibc; elsewhere a no-op).

    glibc serves each allocation of 32 MB or more with a fresh mmap and unmaps it when freed. On a CPU a ViT-L/14 at
    batch 8 makes such tensors in every block (an MLP activation is 8 x 257 x 4096 floats, 33.7 MB), so every one of
    their pages is faulted in and zeroed again and again: 3.8 to 5.1 million page faults in a 24-pair validation here,
    against 0.8 million with this. The arithmetic, and so every score, is unchanged."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's own symbol: mallopt's parameters below are glibc's
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)  # large blocks from the heap too, where a freed block is reused ...
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # ... and the heap's free top is kept, not returned


# pyproject.toml's extras, by the module a command imports from each (transformers is also in generators)
EXTRAS = {"duckdb": "mine", "sqlglot": "mine", "pyspark": "mine", "transformers": "peers", "diffusers": "generators",
          "peft": "generators", "fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "multipart": "serve",
          "python_multipart": "serve", "prometheus_client": "serve", "requests": "serve", "ray": "serve"}


def run_cli(main, keep_freed=True):
    """Run a script's main(): a user's mistake ends in one line naming the culprit and exit status 2, not a traceback;
    so does a package of an extra that is not installed (naming the extra to install). With keep_freed (a script that
    runs a model), the process keeps its freed memory (keep_freed_memory): a script's process is its own."""
    if keep_freed:
        keep_freed_memory()

    def main_naming_extras():
        try:
            main()
        except ModuleNotFoundError as e:
            extra = EXTRAS.get((e.name or "").split(".")[0])
            if extra is None:
                raise
            raise InputError(f"{e.name} is not installed: this needs the {extra} extra: pip install -e '.[{extra}]' "
                             f"(requirements.txt installs every extra)") from None
    one_line_errors(main_naming_extras)


def add_model_flags(parser, inference=False):
    """The flags every script shares: which model and weights, how images load; with `inference`, where and how
    fast to encode too (add_inference_flags)."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name or model-config .json")
    parser.add_argument("--pretrained", default=DEFAULT_PRETRAINED, help="open_clip weights tag, weights file, or none")
    parser.add_argument("--checkout_path", default=None, help="fine-tuned weights (OpenAI-format state dict)")
    (add_inference_flags if inference else add_loading_flags)(parser)


def add_loading_flags(parser):
    parser.add_argument("--num_workers", type=int, default=None,
                        help="DataLoader workers (default: 0 on a CPU, else the CPUs here, at most 8)")
    parser.add_argument("--fast_decode", action="store_true",
                        help="decode JPEGs at reduced scale (PIL draft), then resize: faster, scores move slightly")


def add_inference_flags(parser):
    """Where and how fast a scoring script encodes: --device, --batch_size, --precision, and how images load."""
    add_loading_flags(parser)
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when there is a GPU)")
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                        help="fp32 (the original's), or autocast to bf16/fp16: faster, scores move slightly")
