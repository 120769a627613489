"""Said: a line is due the first time, when its text changes, and after ``repeat`` seconds."""

from tunproxy.logonce import Said


def test_once_per_key_until_the_text_changes_or_it_is_forgotten():
    said = Said()
    assert said.due("10.100.2.0/24", "unreachable")
    assert not said.due("10.100.2.0/24", "unreachable", now=1e9)  # no repeat: never again
    assert said.due("10.100.3.0/24", "unreachable")  # another key
    assert said.due("10.100.2.0/24", "route table full")  # the reason changed
    assert said.get("10.100.2.0/24") == "route table full" and said.get("nope", "-") == "-"
    said.forget("10.100.2.0/24")
    assert "10.100.2.0/24" not in said
    assert said.due("10.100.2.0/24", "route table full")


def test_repeat_says_a_persistent_line_again_after_the_interval():
    said = Said(repeat=60.0)
    assert said.due(("tun->udp", 105), now=100.0)
    assert not said.due(("tun->udp", 105), now=159.9)
    assert said.due(("tun->udp", 105), now=160.0)
    assert not said.due(("tun->udp", 105), now=200.0)  # counted from the last time it was said
