"""Build the small byte-level BPE tokenizer shipped in `assets/tokenizer/`.

The hub is out of reach on the machines this project is tested on, so the main job and the tests use this
tokenizer instead of Llama-2's. It is Llama-like: `<unk>`=0, `<s>`=1, `</s>`=2, BOS prepended to every encoding, and
its highest ids are rare merges that OpenVLA overwrites with action tokens (the last `num_action_bins` ids).

    python scripts/build_tokenizer.py --output assets/tokenizer --vocab-size 1024
"""

import argparse
import itertools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown"]
OBJECTS = ["block", "ball", "cube", "cup", "bowl", "drawer", "button", "door", "handle", "can", "bottle", "plate"]
VERBS = ["move to", "go to", "reach", "push", "pick up", "put down", "open", "close", "press", "grasp", "place", "slide"]
DIRECTIONS = ["left", "right", "up", "down", "forward", "back", "from the top", "from the side"]
WORDS = (
    "the a an on in of with to toward into onto near far from at by over under above below behind beside between "
    "table gripper arm hand robot object position goal scene camera image task episode step action instruction "
    "and then it is this that there here what which where when how should would could can will must may not "
    "top bottom middle center corner edge side front rear inside outside open closed empty full small large "
    "small big tall short long round square flat soft hard light heavy new old clean dirty wet dry hot cold "
    "stack sort wipe pour fold lift drop turn rotate flip insert remove sweep stir cut wash hang lower raise "
    "sink stove oven fridge microwave cabinet shelf counter floor wall window lamp chair box basket tray towel "
    "spoon fork knife pan pot lid cloth sponge marker pen book paper banana apple carrot eggplant corn potato"
)


def training_corpus() -> list[str]:
    """Instruction-like sentences the tokenizer learns its merges from."""
    sentences = [WORDS, " ".join(str(number) for number in range(1000))]
    for verb, colour, thing, direction in itertools.product(VERBS, COLOURS, OBJECTS, DIRECTIONS):
        sentences.append(f"In: What action should the robot take to {verb} the {colour} {thing} {direction}?\nOut:")
    return sentences


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with `vocab_size` ids (special tokens first) and wrap it for transformers."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(f"The corpus only supports {tokenizer.get_vocab_size()} tokens, fewer than vocab_size={vocab_size}.")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "tokenizer")
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args()
    tokenizer = build_tokenizer(args.vocab_size)
    tokenizer.save_pretrained(args.output)
    print(f"Wrote a {len(tokenizer)}-token tokenizer to {args.output}")


if __name__ == "__main__":
    main()
