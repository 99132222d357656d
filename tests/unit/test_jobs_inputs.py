"""A job's input_data checked at submission: each mistake one line naming the entry and the fix."""

from __future__ import annotations

import pytest

from spinnaker_jupyter.jobs.inputs import MAX_FILES, InputError, parse


def test_urls_and_objects_become_files_in_the_jobs_folder():
    assert parse(None) is None and parse([]) is None
    assert parse(
        [
            "https://example.org/data/spikes%20a.csv",
            {"url": "http://example.org/x?y=1", "path": "inputs/./x.bin", "content_type": "x", "hash": "h"},
        ]
    ) == [
        {"url": "https://example.org/data/spikes%20a.csv", "path": "spikes a.csv"},
        {"url": "http://example.org/x?y=1", "path": "inputs/x.bin"},
    ]


@pytest.mark.parametrize(
    "value, message",
    [
        ("http://example.org/a", "input_data: expected a list of URLs"),
        ([3], "input_data[0]: expected a URL or an object with a url"),
        (["ftp://example.org/a"], "input_data[0].url: 'ftp://example.org/a' is not an http(s) URL"),
        (["http://example.org/a b"], "is not an http(s) URL"),
        ([{"path": "a"}], "input_data[0].url: None is not an http(s) URL"),
        ([{"url": "http://example.org/a", "mode": 1}], "input_data[0].mode: unknown key"),
        (["http://example.org/"], "input_data[0]: http://example.org/ names no file; give a path for it"),
        ([{"url": "http://example.org/a", "path": "../a"}], "input_data[0].path: '../a' must be a relative path"),
        ([{"url": "http://example.org/a", "path": "/etc/a"}], "must be a relative path inside the job's folder"),
        ([{"url": "http://example.org/a", "path": ".job/packages/six.py"}], "not .job or .git"),
        ([{"url": "http://example.org/a", "path": 3}], "input_data[0].path: expected a string"),
        (["http://example.org/a", "http://mirror.example.org/a"], "input_data[1].path: 'a' is given twice"),
        (["http://example.org/a"] * (MAX_FILES + 1), f"at most {MAX_FILES} per job"),
    ],
)
def test_mistakes_are_named(value, message):
    with pytest.raises(InputError) as err:
        parse(value)
    assert message in str(err.value) and "\n" not in str(err.value)
