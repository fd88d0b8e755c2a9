from hypothesis import given
from hypothesis import strategies as st

from mesh402.serving.stops import StopMatcher


def feed(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = "".join(m.push(p) for p in pieces)
    return out + m.flush(), m.stopped


def test_stop_split_across_pieces() -> None:
    assert feed(["END"], ["abc E", "N", "D more"]) == ("abc ", True)


def test_partial_stop_is_released_when_it_does_not_complete() -> None:
    assert feed(["END"], ["abc EN", "x"]) == ("abc ENx", False)


def test_earliest_of_several_stops_wins() -> None:
    assert feed(["b", "a"], ["xxab"]) == ("xx", True)


def test_no_stops_passes_everything() -> None:
    assert feed([], ["a", "b"]) == ("ab", False)


@given(st.lists(st.text(alphabet="abcX", max_size=5), max_size=8), st.text(alphabet="abcX", min_size=1, max_size=3))
def test_output_is_text_before_first_stop(pieces: list[str], stop: str) -> None:
    whole = "".join(pieces)
    out, stopped = feed([stop], pieces)
    if stop in whole:
        assert stopped and out == whole[: whole.find(stop)]
    else:
        assert not stopped and out == whole
