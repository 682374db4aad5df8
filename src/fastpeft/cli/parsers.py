"""argparse definitions of the subcommands (``train``, ``inspect``, ``merge``, ``demo``).

``train``'s method options are generated from the chosen method's config dataclass (see ``options``).
"""

from __future__ import annotations

import argparse

from .common import TASKS, positive_float, positive_int
from .options import DEFAULT_METHOD, add_method_flags, known_methods, resolve_method

TRAIN_EPILOG = """\
DATA columns: 'text' for causal-lm; 'text' and 'label' (integer or string) for seq-cls.
Method options are shown for --method {method}; run 'fastpeft train --method NAME --help' for another
method's options. A --config file (YAML or JSON) holds the same options by field name, e.g.
'r: 8' or 'target_modules: [q_proj, v_proj]'; flags override it. A list-or-string option given one value
that is not a plain name (a regex, 'all-linear') is passed as a string.
"""


def _subparser(sub, name: str, help_text: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False, **kwargs)


def add_train(sub, method: str = DEFAULT_METHOD) -> argparse.ArgumentParser:
    parser = _subparser(sub, "train", "Fine-tune an adapter on a JSONL/CSV dataset and save it",
                        epilog=TRAIN_EPILOG.format(method=method),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="base model folder or Hub repo id")
    parser.add_argument("data", metavar="DATA", help="training data: .jsonl, .json, .csv or .tsv")
    parser.add_argument("--method", default=DEFAULT_METHOD,
                        help=f"adapter method (default: %(default)s); one of: {', '.join(known_methods())}")
    parser.add_argument("--config", help="YAML or JSON file with method options")
    parser.add_argument("--task", choices=sorted(TASKS), default="causal-lm", help="(default: %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=3, help="(default: %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=1e-3,
                        help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="(default: %(default)s)")
    parser.add_argument("--max-length", type=positive_int, default=128,
                        help="tokens per example (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for init and shuffling (default: %(default)s)")
    parser.add_argument("--eval-data", help="optional evaluation file (same columns), scored after training")
    parser.add_argument("--output-dir", default="./fastpeft_output", help="(default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last epoch checkpoint in --output-dir")
    group = parser.add_argument_group(f"method options ({method})")
    taken = {opt for action in parser._actions for opt in action.option_strings}
    add_method_flags(group, resolve_method(method).config_cls, taken)
    return parser


def add_inspect(sub) -> argparse.ArgumentParser:
    parser = _subparser(sub, "inspect",
                        "Describe an adapter folder: method, base, targets, ranks, norms, size")
    parser.add_argument("adapter", metavar="ADAPTER", help="folder with adapter_config.json and weights")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return parser


def add_merge(sub) -> argparse.ArgumentParser:
    parser = _subparser(sub, "merge",
                        "Merge an adapter into its base model and save a plain transformers model")
    parser.add_argument("base", metavar="BASE", help="base model folder or Hub repo id")
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter folder")
    parser.add_argument("out", metavar="OUT", help="output folder for the merged model")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    parser.add_argument("--safe-merge", action="store_true",
                        help="check merged weights for NaNs before saving")
    return parser


def add_demo(sub) -> argparse.ArgumentParser:
    demo = sub.add_parser(
        "demo",
        help="LoRA-fine-tune all-MiniLM-L6-v2 on a toy sentiment task, save and reload the adapter",
        description="LoRA-fine-tune sentence-transformers/all-MiniLM-L6-v2 for sequence classification on a "
        "generated sentiment task (well under a minute on CPU), save the adapter, reload it "
        "and check predictions.",
    )
    demo.add_argument("--output-dir", default="./demo_output",
                      help="where the adapter is saved (default: %(default)s)")
    demo.add_argument("--epochs", type=positive_int, default=None,
                      help="training epochs (default: 3, or 1 with --quick)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed for data, head init and shuffling (default: %(default)s)")
    demo.add_argument("--quick", action="store_true",
                      help="tiny run (few steps, a few seconds) for smoke tests")
    return demo
