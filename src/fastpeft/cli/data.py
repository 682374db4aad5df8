"""Deterministic toy sentiment task for ``fastpeft demo``.

Reviews are built from templates, products and sentiment phrases. The test split uses
templates, products and wording that never appear in training, so accuracy measures
generalisation rather than memorisation. Label 1 = positive, 0 = negative.
"""

from __future__ import annotations

import random

_TRAIN = {
    "templates": [
        "The {product} is {adj}.",
        "This {product} turned out {adj}.",
        "I bought the {product} and it is {adj}.",
        "Honestly, my new {product} feels {adj}.",
        "Overall the {product} was {adj}, {tail}.",
        "{Tail}: the {product} is {adj}.",
    ],
    "products": ["speaker", "blender", "backpack", "keyboard", "lamp", "kettle", "jacket", "phone case"],
    "pos": ["excellent", "wonderful", "great", "fantastic", "reliable", "well made", "a delight"],
    "neg": ["terrible", "awful", "useless", "flimsy", "disappointing", "badly made", "a nightmare"],
    "pos_tail": ["I would buy it again", "highly recommended", "five stars", "worth every penny"],
    "neg_tail": ["I want a refund", "avoid it", "one star", "a waste of money"],
}

_TEST = {
    "templates": [
        "My {product} is {adj}.",
        "After a week, this {product} seems {adj}.",
        "We ordered a {product} and found it {adj}, {tail}.",
        "In short, the {product}: {adj}. {Tail}.",
    ],
    "products": ["vacuum cleaner", "desk chair", "coffee maker", "umbrella", "monitor", "toaster"],
    "pos": ["superb", "amazing", "lovely", "outstanding", "sturdy", "perfect"],
    "neg": ["horrible", "broken", "worthless", "dreadful", "cheap and fragile", "defective"],
    "pos_tail": ["totally happy with it", "love it", "best purchase this year"],
    "neg_tail": ["returning it tomorrow", "never again", "very unhappy"],
}


def _make_split(spec: dict, n: int, rng: random.Random) -> tuple[list[str], list[int]]:
    """Generate ``n`` balanced examples from one vocabulary ``spec``."""
    texts: list[str] = []
    labels: list[int] = []
    for i in range(n):
        label = i % 2
        key = "pos" if label else "neg"
        tail = rng.choice(spec[f"{key}_tail"])
        text = rng.choice(spec["templates"]).format(
            product=rng.choice(spec["products"]),
            adj=rng.choice(spec[key]),
            tail=tail,
            Tail=tail[0].upper() + tail[1:],
        )
        texts.append(text)
        labels.append(label)
    order = list(range(n))
    rng.shuffle(order)
    return [texts[i] for i in order], [labels[i] for i in order]


def make_dataset(n_train: int = 320, n_test: int = 112, seed: int = 0):
    """Return ``(train_texts, train_labels, test_texts, test_labels)``, fully determined by ``seed``."""
    rng = random.Random(seed)
    train = _make_split(_TRAIN, n_train, rng)
    test = _make_split(_TEST, n_test, rng)
    return train[0], train[1], test[0], test[1]
