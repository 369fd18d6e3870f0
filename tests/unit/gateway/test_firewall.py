"""The sessions firewall's rules (pure: what iptables is asked for, in order)."""

from __future__ import annotations

from gateway.services.runtime.firewall import Allowed, bridge_name, chain_name, chain_rules


def test_names_fit_linux_and_iptables_limits_and_are_stable() -> None:
    assert bridge_name("ccgate-sessions") == bridge_name("ccgate-sessions")
    assert bridge_name("ccgate-sessions") != bridge_name("other")
    assert len(bridge_name("x" * 200)) <= 15  # IFNAMSIZ - 1
    assert len(chain_name("x" * 200)) <= 28  # iptables chain names
    assert chain_name("a").startswith("CCGATE-") and bridge_name("a").startswith("ccg-")


def test_established_first_each_destination_once_and_reject_last() -> None:
    rules = chain_rules(
        [Allowed("172.17.0.1", 8000), Allowed("172.17.0.1", 6379), Allowed("172.17.0.1", 8000)]
    )
    assert rules[0][-1] == "ACCEPT" and "RELATED,ESTABLISHED" in rules[0]
    assert rules[-1] == ["-j", "REJECT"]
    middle = rules[1:-1]
    assert len(middle) == 2  # the duplicate is dropped
    for rule, port in zip(middle, ("6379", "8000"), strict=True):
        assert rule[rule.index("--ctorigdst") + 1] == "172.17.0.1"
        assert rule[rule.index("--ctorigdstport") + 1] == port
        assert rule[:2] == ["-p", "tcp"] and rule[-1] == "ACCEPT"


def test_nothing_allowed_is_still_a_closed_chain() -> None:
    assert chain_rules([]) == [
        ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"],
        ["-j", "REJECT"],
    ]


def test_an_open_chain_refuses_the_host_and_private_ranges_and_returns_the_rest() -> None:
    rules = chain_rules([Allowed("172.17.0.1", 8000)], open_egress=True)
    assert rules[0][-1] == "ACCEPT" and rules[1][-1] == "ACCEPT"
    assert ["-m", "addrtype", "--dst-type", "LOCAL", "-j", "REJECT"] in rules
    refused = {r[r.index("--ctorigdst") + 1] for r in rules[2:] if "--ctorigdst" in r}
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8"} <= refused
    assert "169.254.0.0/16" in refused
    assert ["-j", "REJECT"] not in rules  # public destinations return to Docker's forwarding
