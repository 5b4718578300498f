"""The headavatar logger: levels, message format, streams, warnings shown through it, progress bars kept whole."""

import io
import logging
import warnings

import pytest
from tqdm import tqdm

from headavatar import log as halog


@pytest.fixture(autouse=True)
def _restore():
    root = logging.getLogger(halog.ROOT)
    level, shower = root.level, warnings.showwarning
    yield
    root.setLevel(level)
    warnings.showwarning = shower


def test_levels_format_and_streams(capsys):
    log = halog.get_logger("headavatar.test")
    assert halog.get_logger("elsewhere").name == "headavatar.elsewhere"
    halog.configure("normal")
    log.info("made %d frames", 3)
    log.debug("details")
    log.warning("careful")
    out, err = capsys.readouterr()
    assert out == "made 3 frames\n" and err == "warning: careful\n"
    halog.configure("quiet")
    log.info("hidden")
    log.error("broken")
    out, err = capsys.readouterr()
    assert out == "" and err == "error: broken\n"
    halog.configure("verbose")
    log.debug("details")
    assert capsys.readouterr().out == "details\n"
    assert [halog.level_of(v) for v in (-1, 0, 2)] == [logging.WARNING, logging.INFO, logging.DEBUG]
    with pytest.raises(ValueError, match="quiet, normal, verbose"):
        halog.configure("loud")


def test_messages_do_not_break_a_progress_bar(capsys, monkeypatch):
    # the bar and the messages share one stream, as on a terminal
    buf = io.StringIO()
    monkeypatch.setattr("sys.stdout", buf)
    halog.configure("normal")
    log = halog.get_logger("headavatar.test")
    with tqdm(total=3, file=buf, ascii=True, mininterval=0) as bar:
        for i in range(3):
            log.info("step %d", i)
            bar.update()
    lines = buf.getvalue().replace("\r", "\n").split("\n")
    # each message is a whole line of its own, not glued to a bar's text
    for i in range(3):
        assert f"step {i}" in lines
    assert not any("step" in line and "|" in line for line in lines)


def test_headavatar_warnings_are_shown_through_the_logger(capsys):
    from headavatar.subjects.importers.common import split_last

    seen = []
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: seen.append((str(message), filename))
    halog.configure("quiet")
    _, notes = split_last(5, 9)
    warnings.warn_explicit(notes[0], UserWarning, halog.__file__, 1)  # as if raised inside headavatar
    assert capsys.readouterr().err == f"warning: {notes[0]}\n"
    warnings.warn_explicit("from elsewhere", UserWarning, "/elsewhere/x.py", 7)
    assert capsys.readouterr().err == "" and seen == [("from elsewhere", "/elsewhere/x.py")]  # others' warnings: shown as before
    # a caller can still catch them
    with pytest.warns(UserWarning, match="holding out"):
        warnings.warn(notes[0], stacklevel=1)
