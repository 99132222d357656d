"""The one wording of durations (words.duration): spawn messages of boards and spalloc, logs."""

from spinnaker_jupyter.words import duration


def test_durations_in_words():
    said = {
        0: "0 s",
        45.9: "45 s",
        89: "89 s",
        90: "1 min 30 s",
        125: "2 min 05 s",
        600: "10 min",
        5399: "89 min 59 s",
        5400: "1 h 30 min",
        7260: "2 h 01 min",
    }
    assert {s: duration(s) for s in said} == said
