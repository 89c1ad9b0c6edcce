"""Calibration and evaluation data for the reference models, built from real data.

Sources (all shipped inside installed wheels, nothing is downloaded):
  * text:   the Wikipedia dump excerpt and the Pang & Lee movie-review sentences in
            gensim's ``test/test_data``;
  * images: the photos in ``skimage/data``.

Split rules (deterministic; nothing is ever shared between "calib" and "eval"):
  * Wikipedia: articles are partitioned, every 4th kept article (index % 4 == 0)
    goes to calib, the others to eval. LM windows and Wikipedia sentences follow the
    article split, so no article contributes to both.
  * Pang & Lee: every 4th sentence (index % 4 == 0, 25 negative + 25 positive) goes
    to calib, the other 150 to eval.
  * Photos: natural photos of recognisable objects (``EVAL_PHOTOS``) are for
    evaluation; the other photographs — textures, the moon, microscopy, a retina, a
    motion-blurred clock (``CALIB_PHOTOS``) — are for calibration. Crops never cross photos.
    Synthetic images (drawings, logos, a checkerboard, a phantom, scanned text) are in
    neither: their activations look nothing like a photograph's, and calibrating on them
    widened MobileNetV2's ranges enough to cost 3–5 points of top-1 agreement.
"""

from __future__ import annotations

import bz2
import functools
import re
from pathlib import Path

import numpy as np
import skimage
import skimage.io
from gensim.corpora.wikicorpus import extract_pages, filter_wiki
from gensim.test.utils import datapath
from PIL import Image

SPLITS = ("calib", "eval")
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
PANG_LEE = "pang_lee_polarity.cor"
MIN_ARTICLE_CHARS = 2000
SENTENCE_WORDS = (5, 60)
SENTENCES_PER_ARTICLE = 6  # the first clean sentences of each article (lead sections read best)

EVAL_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right",
               "camera", "coins")
CALIB_PHOTOS = ("brick", "grass", "gravel", "moon", "cell", "clock_motion", "retina",
                "hubble_deep_field", "ihc", "microaneurysms")

# Acceptable ImageNet-1k classes for the eval photos with a recognisable object.
IMAGE_LABELS: dict[str, set[int]] = {
    "chelsea": {281, 282, 285},           # tabby, tiger cat, Egyptian cat
    "coffee": {504, 967, 968},            # coffee mug, espresso, cup
    "rocket": {657, 744, 812},            # missile, projectile, space shuttle
    "motorcycle_left": {665, 670},        # moped, motor scooter
    "motorcycle_right": {665, 670},
    "camera": {759, 872},                 # reflex camera, tripod (cameraman behind a tripod camera)
}

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
RESIZE, CROP = 256, 224
CROP_SCALES = (256, 320)  # shorter side before cropping, for the extra crops
CROP_POSITIONS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")
VIEWS_PER_PHOTO = len(CROP_SCALES) * len(CROP_POSITIONS) * 2  # with crops=True; includes the standard view


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _in_split(index: int, split: str) -> bool:
    """The shared 1-in-4 rule: index % 4 == 0 is calibration, the rest evaluation."""
    _check_split(split)
    return (index % 4 == 0) == (split == "calib")


# ----------------------------------------------------------------------------- text

def _clean_wiki(markup: str) -> str:
    """Plain prose from wiki markup: no bold/italic quotes, headings as lines, no lists/tables."""
    text = filter_wiki(markup).replace("'''", "").replace("''", "")
    text = re.sub(r" ?\((?:\s|[;,])*\)", "", text)  # empty parentheses left by removed templates
    lines = []
    for line in text.splitlines():
        line = line.strip()
        heading = re.fullmatch(r"=+\s*(.*?)\s*=+", line)
        if heading:
            lines.append("\n" + heading.group(1))
        elif line and line[0] not in "*#:;|!{}":
            lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _is_article(title: str, text: str) -> bool:
    """Real articles only: no redirects, namespaces, disambiguation or very short pages."""
    return (":" not in title and "(disambiguation)" not in title and "may refer to" not in text[:500]
            and len(text) >= MIN_ARTICLE_CHARS)


@functools.cache
def _wikipedia_texts() -> tuple[tuple[str, str], ...]:
    with bz2.open(datapath(WIKI_DUMP)) as dump:
        pages = [(title, _clean_wiki(markup)) for title, markup, _ in extract_pages(dump)
                 if not markup.lstrip().lower().startswith("#redirect")]
    return tuple((title, text) for title, text in pages if _is_article(title, text))


def wikipedia_texts() -> list[tuple[str, str]]:
    """(title, plain text) of the real articles in gensim's Wikipedia test dump, in dump order."""
    return list(_wikipedia_texts())


def _split_articles(split: str) -> list[tuple[str, str]]:
    return [article for i, article in enumerate(_wikipedia_texts()) if _in_split(i, split)]


def lm_windows(tokenizer, split: str, n: int | None = None, seq_len: int = 512) -> list[np.ndarray]:
    """Non-overlapping ``seq_len``-token windows (int64 [1, seq_len]) of the split's articles.

    The split's articles are joined with blank lines, tokenized once without special
    tokens, and cut into consecutive windows; the ragged tail is dropped.
    """
    text = "\n\n".join(body for _, body in _split_articles(split))
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    count = len(ids) // seq_len if n is None else min(n, len(ids) // seq_len)
    return [ids[i * seq_len:(i + 1) * seq_len].reshape(1, seq_len) for i in range(count)]


def _is_clean_sentence(sentence: str) -> bool:
    """Readable sentences: 5-60 words, capitalised, end punctuation, no markup residue."""
    words = len(sentence.split())
    return (SENTENCE_WORDS[0] <= words <= SENTENCE_WORDS[1] and sentence[0].isupper()
            and sentence[-1] in ".!?" and not re.search(r"[=|{}\[\]<>*#_]| [.,;:)]|\( ", sentence))


def _wiki_sentences(text: str) -> list[str]:
    """The first clean sentences of an article's paragraphs."""
    candidates = (s.strip() for paragraph in text.splitlines()
                  for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", paragraph))
    return [s for s in candidates if _is_clean_sentence(s)][:SENTENCES_PER_ARTICLE]


@functools.cache
def _pang_lee() -> tuple[tuple[str, int], ...]:
    """(sentence, label) for the 200 Pang & Lee sentences; label 1 = positive, 0 = negative."""
    lines = Path(datapath(PANG_LEE)).read_bytes().decode("cp1252").splitlines()
    return tuple((line.split(maxsplit=1)[1].strip(), int(line.startswith("__label__pos")))
                 for line in lines if line.strip())


@functools.cache
def _labelled_sentences(split: str) -> tuple[tuple[str, int | None], ...]:
    """The split's (sentence, sentiment label or None for Wikipedia), deduplicated and shuffled
    with a fixed seed so any prefix mixes both sources; calib drops anything also in eval."""
    pairs = [pair for i, pair in enumerate(_pang_lee()) if _in_split(i, split)]
    pairs += [(s, None) for _, text in _split_articles(split) for s in _wiki_sentences(text)]
    unique = list(dict(pairs).items())
    if split == "calib":
        held_out = {s for s, _ in _labelled_sentences("eval")}
        unique = [pair for pair in unique if pair[0] not in held_out]
    order = np.random.default_rng(0).permutation(len(unique))
    return tuple(unique[i] for i in order)


def sentences(split: str) -> list[str]:
    """Real English sentences (movie reviews + Wikipedia) for MiniLM calibration/evaluation."""
    return [s for s, _ in _labelled_sentences(split)]


def sentence_labels(split: str) -> list[int | None]:
    """Pang & Lee sentiment (1 positive, 0 negative) aligned with ``sentences(split)``; None for Wikipedia."""
    return [label for _, label in _labelled_sentences(split)]


def encoder_feeds(tokenizer, texts: list[str], batch_size: int = 1, max_length: int = 128,
                  pad: bool = False) -> list[dict[str, np.ndarray]]:
    """MiniLM feeds (int64 input_ids / attention_mask / token_type_ids), truncated at ``max_length``.

    pad=False gives one unpadded feed per text (batch_size must be 1); pad=True gives
    batches of ``batch_size`` padded to the longest text in the batch.
    """
    if not pad and batch_size != 1:
        raise ValueError("unpadded feeds hold one text each; use pad=True for batch_size > 1")
    feeds = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], padding="longest" if pad else False,
                            truncation=True, max_length=max_length, return_tensors="np")
        feeds.append({key: encoded[key].astype(np.int64)
                      for key in ("input_ids", "attention_mask", "token_type_ids")})
    return feeds


# ----------------------------------------------------------------------------- images

def _read_photo(name: str) -> np.ndarray:
    """A photo shipped in ``skimage/data`` as uint8 HxWx3 (gray replicated, alpha over white)."""
    folder = Path(skimage.data.__file__).parent
    path = next(p for p in (folder / f"{name}.png", folder / f"{name}.jpg") if p.exists())
    image = skimage.io.imread(path)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.shape[-1] == 4:
        alpha = image[..., 3:].astype(np.float32) / 255
        image = np.round(image[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return image


def images(split: str) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 HxWx3) photos of the split; see ``EVAL_PHOTOS`` / ``CALIB_PHOTOS``."""
    _check_split(split)
    return [(name, _read_photo(name)) for name in (EVAL_PHOTOS if split == "eval" else CALIB_PHOTOS)]


def _resize_shorter(image: np.ndarray, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bilinear, antialiased, like torchvision on PIL)."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    target = (max(size, round(width * scale)), max(size, round(height * scale)))
    return Image.fromarray(image).resize(target, Image.BILINEAR)


def _crop(image: Image.Image, position: str) -> Image.Image:
    """A CROP x CROP window at a named position (center uses torchvision's rounding)."""
    width, height = image.size
    left = {"center": round((width - CROP) / 2), "top_left": 0, "bottom_left": 0}.get(position, width - CROP)
    top = {"center": round((height - CROP) / 2), "top_left": 0, "top_right": 0}.get(position, height - CROP)
    return image.crop((left, top, left + CROP, top + CROP))


def _normalize(view: Image.Image) -> np.ndarray:
    """uint8 HWC -> ImageNet-normalised float32 CHW."""
    pixels = np.asarray(view, dtype=np.float32) / 255
    return ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def _views(image: np.ndarray, crops: bool) -> list[np.ndarray]:
    """The standard view (shorter side 256, center 224); with ``crops`` 19 more
    (shorter side 256/320 x center/4 corners x horizontal flip)."""
    views = [_normalize(_crop(_resize_shorter(image, RESIZE), "center"))]
    if crops:
        for scale in CROP_SCALES:
            resized = _resize_shorter(image, scale)
            for position in CROP_POSITIONS:
                crop = _crop(resized, position)
                for flip in (False, True):
                    if (scale, position, flip) != (RESIZE, "center", False):
                        views.append(_normalize(crop.transpose(Image.FLIP_LEFT_RIGHT) if flip else crop))
    return views


def image_feeds(split: str, crops: bool = False, batch_size: int = 1) -> list[dict[str, np.ndarray]]:
    """MobileNetV2 feeds {"image": float32 [batch, 3, 224, 224]} from the split's photos.

    Views are ordered photo by photo (standard view first); the last batch may be smaller.
    """
    views = [view for _, image in images(split) for view in _views(image, crops)]
    return [{"image": np.stack(views[start:start + batch_size])} for start in range(0, len(views), batch_size)]


def image_names(split: str, crops: bool = False) -> list[str]:
    """Photo name of every view in ``image_feeds(split, crops, batch_size=1)`` (for labels)."""
    per_photo = VIEWS_PER_PHOTO if crops else 1
    return [name for name in (EVAL_PHOTOS if split == "eval" else CALIB_PHOTOS) for _ in range(per_photo)]


# ----------------------------------------------------------------------------- files

def model_feeds(name: str, split: str, n: int | None = None, cache_dir: Path | None = None) -> list[dict]:
    """The standard feeds for a reference model: LM windows, unpadded sentences, or image crops."""
    from models import load_tokenizer  # the package imports this module lazily

    if name == "smollm2":
        return [{"input_ids": window} for window in lm_windows(load_tokenizer(name, cache_dir), split, n)]
    if name == "minilm":
        return encoder_feeds(load_tokenizer(name, cache_dir), sentences(split)[:n])
    if name == "mobilenetv2":
        return image_feeds(split, crops=True)[:n]
    raise ValueError(f"unknown model {name!r}")


def save_feeds_npz(feeds: list[dict], path) -> Path:
    """Save feeds in the two layouts ``--calib-data`` reads, exactly at ``path``:

    * ``path`` ending in ``.npz``: one file, arrays stacked on a new leading sample axis (all
      feeds must share shapes);
    * any other ``path``: a folder of one ``.npz`` per feed (shapes may differ).
    """
    if not feeds:
        raise ValueError("no feeds to save")
    path = Path(path)
    if path.suffix == ".npz":
        shapes = {tuple((key, value.shape) for key, value in sorted(feed.items())) for feed in feeds}
        if len(shapes) != 1:
            raise ValueError(f"the samples differ in shape; give a folder path (without .npz), not {path}")
        np.savez(path, **{key: np.stack([feed[key] for feed in feeds]) for key in feeds[0]})
        return path
    path.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(path / f"{i:05d}.npz", **feed)
    return path
