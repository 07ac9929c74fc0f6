"""How long the PII finders take: a 2 KB chat prompt and a 1 MB text (timeit medians).

.venv/bin/python bench/redaction_speed_pii.py
"""

from __future__ import annotations

import statistics
import timeit
from collections.abc import Callable

from extproc.redaction import pii
from extproc.redaction.findings import Finder

REGIONS = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "BR", "IN", "JP")

PROMPT = (
    "Hi! I'm refactoring our billing service and could use a second pair of eyes. "
    "Customer Jane Doe (jane.doe@example.com, phone +1 415-555-2671) reported that "
    "invoice 2024-118 was charged twice on 2024-01-15. Here is what the worker logs:\n\n"
    "    [12:30:45] retry 3/5 for job 8f14e45f-ceea-467f-a0e6-6b3c2f1e9d4b (took 1.25s)\n"
    "    [12:30:47] charged 1,234.56 USD, idempotency key reused, version 2.14.3\n\n"
    "The function below is supposed to skip a charge when the key was seen in the last "
    "24 hours, but it does not. Could you explain why, and suggest a fix that works with "
    "Python 3.11? We keep about 50,000 keys in Redis with a TTL of 86400 seconds.\n\n"
    "def charge(customer, amount, key):\n"
    "    if cache.get(key) is not None:\n"
    "        return cache.get(key)\n"
    "    result = gateway.charge(customer.card_token, amount)\n"
    "    cache.set(key, result, ttl=86400)\n"
    "    return result\n\n"
    "Also, what is the best way to test this without hitting the real gateway? We use "
    "pytest and would rather not mock the whole HTTP client. Thanks a lot!\n"
)


def finders() -> dict[str, Finder]:
    return {
        "email": pii.find_email,
        "phone": pii.phone_finder(REGIONS),
        "credit_card": pii.find_credit_card,
        "iban": pii.find_iban,
        "us_ssn": pii.find_us_ssn,
        "ip_address": pii.find_ip_address,
    }


def median_us(fn: Callable[[], object], number: int, repeat: int = 7) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    text = (PROMPT * 4)[:2048]
    big = (PROMPT * (1_048_576 // len(PROMPT) + 1))[:1_048_576]
    fs = finders()
    default = [f for name, f in fs.items() if name != "ip_address"]

    def all_on(t: str) -> Callable[[], object]:
        return lambda: [x for f in default for x in f(t)]

    for name, f in fs.items():
        print(f"{name:12} 2 KB {median_us(lambda f=f: list(f(text)), 2000):8.1f} µs")
    print(f"{'default PII':12} 2 KB {median_us(all_on(text), 2000):8.1f} µs")
    print(f"{'default PII':12} 1 MB {median_us(all_on(big), 3, repeat=3) / 1000:8.1f} ms")


if __name__ == "__main__":
    main()
