"""A labelled corpus for measuring the redaction detectors, generated from a seed.

``generate(seed, documents)`` returns documents of several shapes (chat prompts,
support tickets, multilingual sentences, CSV, JSON, ``.env`` files, logs, code) in
ten locales, with PII and secrets planted at exact offsets (``labels``) and hard
negatives that look like them but are not (``decoys``): UUIDs, hashes, dates,
amounts, order numbers, ISBNs, non-Luhn 16-digit numbers, IBANs with a bad checksum,
placeholder keys, ... About a quarter of the documents carry decoys only.

Every value is made here or by ``faker`` from the seeded generators, so one seed is
one corpus. Nothing is written to disk: the corpus is data made on demand.
"""

from __future__ import annotations

import base64
import json
import random
import re
import string
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import phonenumbers
from faker import Faker
from faker.providers.address.it_IT import Provider as _ItalianAddress

from extproc.keys import PREFIX as TOLLWAY_PREFIX
from extproc.redaction.secrets import SECRET_KINDS

# The locales and the phone region of each.
REGIONS = {
    "en_US": "US",
    "en_GB": "GB",
    "de_DE": "DE",
    "fr_FR": "FR",
    "es_ES": "ES",
    "it_IT": "IT",
    "nl_NL": "NL",
    "pt_BR": "BR",
    "ja_JP": "JP",
    "hi_IN": "IN",
}
LOCALES = tuple(REGIONS)
SHAPES = ("chat", "ticket", "multilingual", "csv", "json", "env", "log", "code")
DECOY_KINDS = (
    "uuid",
    "git_sha",
    "sha256",
    "timestamp",
    "date",
    "epoch",
    "version",
    "amount",
    "order_number",
    "isbn",
    "non_luhn",
    "bad_iban",
    "data_uri",
    "placeholder",
    "oid",
    "mac",
    "time",
    "postcode",
    "quantity",
    "coordinates",
)
# Secret kinds known only by the name they are assigned to (``password=…``).
NAMED_ONLY = ("aws_secret_key", "generic_secret")
# Values that stand where a secret would and are not one.
PLACEHOLDERS = (
    "sk-xxxxxxxx",
    "sk-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "sk-...",
    "your-api-key-here",
    "YOUR_API_KEY",
    "<API_KEY>",
    "<your-token>",
    "${OPENAI_API_KEY}",
    "${DB_PASSWORD}",
    "$SECRET_KEY",
    "{{ api_key }}",
    "********",
    "xxxxxxxxxxxxxxxxxxxx",
    "REPLACE_ME",
    "<redacted>",
    "[REDACTED]",
    "process.env.OPENAI_API_KEY",
    "os.environ.get(OPENAI_API_KEY)",
)


@dataclass(frozen=True, slots=True)
class Label:
    """``text[start:end]`` is an entity of type ``entity``; ``kind`` is the secret kind
    for secrets, else the entity type."""

    start: int
    end: int
    entity: str
    kind: str


@dataclass(frozen=True, slots=True)
class Decoy:
    """``text[start:end]`` looks like an entity and is not one: a ``kind`` of DECOY_KINDS."""

    start: int
    end: int
    kind: str


@dataclass(frozen=True, slots=True)
class Document:
    text: str
    labels: list[Label]
    decoys: list[Decoy]
    locale: str
    shape: str

    @property
    def negative(self) -> bool:
        return not self.labels


# ---- values -------------------------------------------------------------------

_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
_URLSAFE = string.ascii_letters + string.digits + "-_"
_ALNUM = string.ascii_letters + string.digits
_BASE32 = string.ascii_uppercase + "234567"
_B64 = string.ascii_letters + string.digits + "+/"
_HEX = "0123456789abcdef"


@dataclass(frozen=True, slots=True)
class _Item:
    """A value to place: a label (entity set) or a decoy (entity None)."""

    value: str
    entity: str | None
    kind: str
    key: str  # its name in structured shapes (a CSV column, a JSON key, an env var)
    phrase: str  # how prose says it, with {} for the value


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        n = int(c) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    compact = iban.replace(" ", "")
    if not re.fullmatch(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{8,30}", compact):
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choices(alphabet, k=n))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _base62(n: int, width: int) -> str:
    out = ""
    while n:
        n, r = divmod(n, 62)
        out = _BASE62[r] + out
    return out.rjust(width, "0")


def github_checksum(body: str) -> str:
    """The 6-character base62 CRC32 that ends a GitHub token (``ghp_`` + 30 + 6)."""
    return _base62(zlib.crc32(body.encode()), 6)


def _secret(rng: random.Random, kind: str) -> str:
    if kind == "openai_key":
        if rng.random() < 0.4:
            return "sk-" + _rand(rng, _ALNUM, 20) + "T3BlbkFJ" + _rand(rng, _ALNUM, 20)
        prefix = rng.choice(("sk-proj-", "sk-proj-", "sk-svcacct-", "sk-admin-"))
        return prefix + _rand(rng, _URLSAFE, 74) + "T3BlbkFJ" + _rand(rng, _URLSAFE, 74)
    if kind == "anthropic_key":
        prefix = rng.choice(("sk-ant-api03-", "sk-ant-api03-", "sk-ant-admin01-"))
        return prefix + _rand(rng, _URLSAFE, 93) + "AA"
    if kind == "aws_access_key":
        return rng.choice(("AKIA", "AKIA", "ASIA")) + _rand(rng, _BASE32, 16)
    if kind == "aws_secret_key":
        return _rand(rng, _B64, 40)
    if kind == "github_token":
        if rng.random() < 0.25:
            return "github_pat_" + _rand(rng, _ALNUM, 22) + "_" + _rand(rng, _ALNUM, 59)
        body = _rand(rng, _ALNUM, 30)
        return (
            rng.choice(("ghp_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_"))
            + body
            + github_checksum(body)
        )
    if kind == "gitlab_token":
        return rng.choice(("glpat-", "glpat-", "gldt-", "glrt-")) + _rand(rng, _URLSAFE, 20)
    if kind == "slack_token":
        if rng.random() < 0.6:
            a, b = _rand(rng, string.digits, rng.randint(10, 13)), _rand(rng, string.digits, 12)
            return f"xoxb-{a}-{b}-{_rand(rng, _ALNUM, 24)}"
        parts = [_rand(rng, string.digits, rng.randint(10, 13)) for _ in range(3)]
        return "xoxp-" + "-".join(parts) + "-" + _rand(rng, _HEX, 32)
    if kind == "stripe_key":
        prefix = rng.choice(("sk_live_", "sk_live_", "rk_live_", "sk_test_"))
        return prefix + _rand(rng, _ALNUM, rng.choice((24, 99)))
    if kind == "google_api_key":
        return "AIza" + _rand(rng, _URLSAFE, 35)
    if kind == "jwt":
        alg = rng.choice(("HS256", "RS256", "ES256"))
        header: dict[str, str] = {"alg": alg, "typ": "JWT"}
        if alg != "HS256":
            header["kid"] = _rand(rng, _ALNUM, 16)
        now = rng.randint(1_600_000_000, 1_800_000_000)
        payload: dict[str, object] = {
            "sub": str(rng.randint(10**6, 10**9)),
            "iat": now,
            "exp": now + 3600,
        }
        if rng.random() < 0.5:
            payload["scope"] = rng.choice(("read", "read write", "admin"))
        sig = rng.randbytes({"HS256": 32, "RS256": 256, "ES256": 64}[alg])
        segments = (json.dumps(header).encode(), json.dumps(payload).encode(), sig)
        return ".".join(_b64url(p) for p in segments)
    if kind == "private_key":
        label = rng.choice(
            ("RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY")
        )
        body = base64.b64encode(rng.randbytes(rng.randint(120, 900))).decode()
        width = 70 if label.startswith("OPENSSH") else 64
        lines = [body[i : i + width] for i in range(0, len(body), width)]
        return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"])
    if kind == "tollway_key":
        return f"{TOLLWAY_PREFIX}{_rand(rng, _HEX, 12)}_{_rand(rng, _URLSAFE, 43)}"
    if kind == "generic_secret":
        return _password(rng, "-_.!*@#%^+=")
    raise ValueError(kind)


def _password(rng: random.Random, symbols: str) -> str:
    """A high-entropy password: 16-40 characters, upper, lower, digits and a symbol."""
    while True:
        value = _rand(rng, _ALNUM + symbols, rng.randint(16, 40))
        classes = [
            any(c.isupper() for c in value),
            any(c.islower() for c in value),
            any(c.isdigit() for c in value),
        ]
        if all(classes) and len(set(value)) >= 12:
            return value


_SECRET_KEYS: dict[str, tuple[str, ...]] = {
    "openai_key": ("OPENAI_API_KEY", "openai_api_key", "api_key"),
    "anthropic_key": ("ANTHROPIC_API_KEY", "anthropic_key", "x-api-key"),
    "aws_access_key": ("AWS_ACCESS_KEY_ID", "aws_access_key_id", "accessKeyId"),
    "aws_secret_key": ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key", "secretAccessKey"),
    "github_token": ("GITHUB_TOKEN", "GH_TOKEN", "github_token"),
    "gitlab_token": ("GITLAB_TOKEN", "gitlab_pat", "CI_DEPLOY_TOKEN"),
    "slack_token": ("SLACK_BOT_TOKEN", "slack_token", "SLACK_USER_TOKEN"),
    "stripe_key": ("STRIPE_SECRET_KEY", "stripe_api_key", "stripeKey"),
    "google_api_key": ("GOOGLE_API_KEY", "GEMINI_API_KEY", "maps_api_key"),
    "jwt": ("id_token", "access_token", "JWT", "session_token"),
    "private_key": ("private_key", "PRIVATE_KEY", "ssh_private_key"),
    "tollway_key": ("TOLLWAY_KEY", "tollway_api_key", "TOLLWAY_API_KEY"),
    "generic_secret": (
        "password",
        "DB_PASSWORD",
        "client_secret",
        "SECRET_KEY",
        "api_secret",
        "passphrase",
        "admin_password",
    ),
}
_SECRET_PHRASES: dict[str, tuple[str, ...]] = {
    # Secrets known by their name only are always assigned: "password: …", not prose.
    "generic_secret": ("password: {}", "db_password = {}", "passwd={}"),
    "aws_secret_key": ("aws_secret_access_key = {}", "AWS_SECRET_ACCESS_KEY={}"),
    "private_key": ("here is the deploy key:\n{}\n", "my ssh key\n{}\nstopped working"),
    "jwt": ("the token {} expires too soon", "Authorization: Bearer {}"),
    "aws_access_key": ("AWS_ACCESS_KEY_ID={}", "my access key {} is rejected", "key id: {}"),
}
_SECRET_PHRASE_DEFAULT = (
    "my key is {} but it says unauthorized",
    "I used {} and got a 401",
    "Authorization: Bearer {}",
    "token: {}",
    "can you check why {} fails?",
)
_ENTITY_KEYS: dict[str, tuple[str, ...]] = {
    "email": ("email", "contact_email", "user_email", "Email", "reply_to"),
    "phone": ("phone", "mobile", "telephone", "phone_number", "Tel"),
    "credit_card": ("card_number", "cc_number", "credit_card", "pan"),
    "iban": ("iban", "IBAN", "bank_account", "payout_iban"),
    "us_ssn": ("ssn", "SSN", "social_security_number"),
    "ip_address": ("ip", "client_ip", "remote_addr", "ip_address", "src_ip"),
}

# Prose per language: {} is the value.
_PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "email": ("my email is {}", "you can reach me at {}", "send the invoice to {}"),
        "phone": ("call me on {}", "my phone number is {}", "phone: {}"),
        "credit_card": ("my card is {} please refund", "card number {}", "I paid with {}"),
        "iban": ("my IBAN is {}", "please transfer it to {}", "IBAN: {}"),
        "ip_address": ("my IP is {}", "requests come from {}", "the server at {} is down"),
        "hello": ("Hi,", "Hello team,", "Hey there!"),
        "bye": ("Please help.", "Thanks!", "Please fix this asap."),
        "order": ("order {}", "my order #{}", "invoice {}"),
        "amount": ("I was charged {}", "the total was {}"),
        "date": ("on {}", "since {}"),
    },
    "de": {
        "email": ("meine E-Mail-Adresse ist {}", "schreiben Sie an {}"),
        "phone": ("meine Telefonnummer ist {}", "rufen Sie mich unter {} an", "Tel.: {}"),
        "credit_card": ("meine Kreditkartennummer ist {}", "Karte {}, bitte erstatten"),
        "iban": ("meine IBAN lautet {}", "bitte überweisen Sie auf {}"),
        "ip_address": ("meine IP-Adresse ist {}",),
        "hello": ("Hallo,", "Guten Tag,"),
        "bye": ("Vielen Dank!", "Bitte helfen Sie mir."),
        "order": ("Bestellung {}", "Rechnungsnummer {}"),
        "amount": ("mir wurden {} abgebucht", "Betrag: {}"),
        "date": ("am {}", "seit dem {}"),
    },
    "fr": {
        "email": ("mon adresse e-mail est {}", "écrivez-moi à {}"),
        "phone": ("mon numéro de téléphone est le {}", "appelez-moi au {}", "tél. : {}"),
        "credit_card": ("ma carte bancaire est {}, merci de me rembourser", "numéro de carte {}"),
        "iban": ("mon IBAN est {}", "virement sur {}"),
        "ip_address": ("mon adresse IP est {}",),
        "hello": ("Bonjour,",),
        "bye": ("Merci d'avance.", "Cordialement."),
        "order": ("commande n° {}", "facture {}"),
        "amount": ("on m'a débité {}", "montant : {}"),
        "date": ("le {}", "depuis le {}"),
    },
    "es": {
        "email": ("mi correo es {}", "escríbeme a {}"),
        "phone": ("mi teléfono es {}", "llámame al {}"),
        "credit_card": ("mi tarjeta es {}, por favor reembolsen", "número de tarjeta {}"),
        "iban": ("mi IBAN es {}", "transfieran a {}"),
        "ip_address": ("mi dirección IP es {}",),
        "hello": ("Hola,", "Buenos días,"),
        "bye": ("Gracias.", "Un saludo."),
        "order": ("pedido {}", "factura {}"),
        "amount": ("me cobraron {}", "importe: {}"),
        "date": ("el {}", "desde el {}"),
    },
    "it": {
        "email": ("la mia email è {}", "scrivetemi a {}"),
        "phone": ("il mio numero di telefono è {}", "chiamatemi al {}"),
        "credit_card": ("la mia carta è {}, vorrei un rimborso", "numero carta {}"),
        "iban": ("il mio IBAN è {}", "bonifico su {}"),
        "ip_address": ("il mio indirizzo IP è {}",),
        "hello": ("Ciao,", "Buongiorno,"),
        "bye": ("Grazie.", "Cordiali saluti."),
        "order": ("ordine {}", "fattura {}"),
        "amount": ("mi hanno addebitato {}", "importo: {}"),
        "date": ("il {}", "dal {}"),
    },
    "nl": {
        "email": ("mijn e-mailadres is {}", "mail naar {}"),
        "phone": ("mijn telefoonnummer is {}", "bel me op {}"),
        "credit_card": ("mijn creditcard is {}, graag terugbetalen", "kaartnummer {}"),
        "iban": ("mijn IBAN is {}", "maak het over naar {}"),
        "ip_address": ("mijn IP-adres is {}",),
        "hello": ("Hoi,", "Beste,"),
        "bye": ("Bedankt!", "Met vriendelijke groet."),
        "order": ("bestelling {}", "factuur {}"),
        "amount": ("er is {} afgeschreven", "bedrag: {}"),
        "date": ("op {}", "sinds {}"),
    },
    "pt": {
        "email": ("meu e-mail é {}", "escreva para {}"),
        "phone": ("meu telefone é {}", "me ligue no {}"),
        "credit_card": ("meu cartão é {}, por favor reembolsem", "número do cartão {}"),
        "iban": ("meu IBAN é {}", "transferir para {}"),
        "ip_address": ("meu endereço IP é {}",),
        "hello": ("Olá,", "Bom dia,"),
        "bye": ("Obrigado!", "Aguardo retorno."),
        "order": ("pedido {}", "nota fiscal {}"),
        "amount": ("fui cobrado {}", "valor: {}"),
        "date": ("em {}", "desde {}"),
    },
    "ja": {
        "email": ("メールアドレスは{}です", "連絡先: {}"),
        "phone": ("電話番号は{}です", "TEL: {}", "携帯 {} までご連絡ください"),
        "credit_card": ("カード番号は{}です。返金をお願いします", "クレジットカード {}"),
        "iban": ("IBANは{}です", "振込先 {}"),
        "ip_address": ("IPアドレスは{}です",),
        "hello": ("こんにちは。", "お世話になっております。"),
        "bye": ("よろしくお願いします。",),
        "order": ("注文番号 {}", "請求書 {}"),
        "amount": ("{}が請求されました", "金額: {}"),
        "date": ("{}から", "{}に"),
    },
    "hi": {
        "email": ("मेरा ईमेल {} है", "कृपया {} पर लिखें"),
        "phone": ("मेरा फ़ोन नंबर {} है", "मुझे {} पर कॉल करें"),
        "credit_card": ("मेरा कार्ड नंबर {} है, कृपया रिफंड करें",),
        "iban": ("मेरा IBAN {} है",),
        "ip_address": ("मेरा IP पता {} है",),
        "hello": ("नमस्ते,",),
        "bye": ("धन्यवाद।", "कृपया मदद करें।"),
        "order": ("ऑर्डर {}", "इनवॉइस {}"),
        "amount": ("मुझसे {} लिया गया", "राशि: {}"),
        "date": ("{} को", "{} से"),
    },
}
_SSN_PHRASES = ("my SSN is {}", "SSN: {}", "social security number {}", "SSN {} on file")
_DECOY_KEYS: dict[str, tuple[str, ...]] = {
    "uuid": ("request_id", "trace_id", "id", "session_id"),
    "git_sha": ("commit", "sha", "revision"),
    "sha256": ("sha256", "checksum", "digest", "etag"),
    "timestamp": ("created_at", "timestamp", "updated_at"),
    "date": ("date", "due_date", "shipped_on"),
    "epoch": ("ts", "epoch", "created", "expires_at"),
    "version": ("version", "app_version", "sdk_version"),
    "amount": ("amount", "total", "price"),
    "order_number": ("order_id", "invoice", "tracking", "part_no", "po_number"),
    "isbn": ("isbn",),
    "non_luhn": ("reference", "account_ref", "serial"),
    "bad_iban": ("ref_account", "iban_old"),
    "data_uri": ("avatar", "image", "thumbnail"),
    "placeholder": (),  # a secret's key
    "oid": ("oid", "policy_oid"),
    "mac": ("mac", "hw_addr", "bssid"),
    "time": ("time", "at"),
    "postcode": ("zip", "postcode", "postal_code"),
    "quantity": ("qty", "weight", "quantity"),
    "coordinates": ("location", "coords"),
}
_DECOY_PHRASES: dict[str, tuple[str, ...]] = {
    "uuid": ("request id {}", "trace {}"),
    "git_sha": ("it broke in commit {}", "on revision {}"),
    "sha256": ("the file hash is {}", "sha256 {}"),
    "timestamp": ("at {}", "logged {}"),
    "epoch": ("timestamp {}", "ts={}"),
    "version": ("after upgrading to {}", "on version {}"),
    "isbn": ("ISBN {}",),
    "non_luhn": ("reference {}", "serial {}"),
    "bad_iban": ("the old account {} is closed",),
    "data_uri": ("my avatar: {}",),
    "placeholder": ("I set the key to {} as in the docs", "api_key={}"),
    "oid": ("OID {}",),
    "mac": ("device MAC {}",),
    "time": ("at {}",),
    "postcode": ("zip code {}", "postcode {}"),
    "quantity": ("{} ordered", "weight {}"),
    "coordinates": ("location {}",),
}
# Fixed bounds, not relative to today: one seed is one corpus on any day.
_EARLIEST, _LATEST = datetime(2015, 1, 1), datetime(2028, 12, 31)
_IT_CITIES: list[str] = sorted(_ItalianAddress.cities)
_SERVICES = ("api", "billing", "auth", "gateway", "worker", "checkout")


class _Values:
    """The seeded value makers for one corpus."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.fakers: dict[str, Faker] = {}
        for locale in LOCALES:
            fake = Faker(locale)
            fake.seed_instance(self.rng.getrandbits(64))
            self.fakers[locale] = fake

    def city(self, locale: str) -> str:
        if locale == "it_IT":  # faker's list of Italian cities is made from a set
            return self.rng.choice(_IT_CITIES)
        return self.fakers[locale].city()

    # -- labels

    def entity(self, entity: str, locale: str, kind: str | None = None, shape: str = "") -> _Item:
        rng, fake, lang = self.rng, self.fakers[locale], locale[:2]
        if entity == "secrets":
            kinds: tuple[str, ...] = SECRET_KINDS
            if shape == "csv":  # a cell is too far from its column's name
                kinds = tuple(k for k in SECRET_KINDS if k not in NAMED_ONLY)
            kind = kind or rng.choice(kinds)
            value = _secret(rng, kind)
            phrase = rng.choice(_SECRET_PHRASES.get(kind, _SECRET_PHRASE_DEFAULT))
            return _Item(value, entity, kind, rng.choice(_SECRET_KEYS[kind]), phrase)
        key = rng.choice(_ENTITY_KEYS[entity])
        if entity == "us_ssn":
            value = self.fakers["en_US"].ssn()
            if rng.random() < 0.3:  # bare 9 digits: only next to "SSN"
                value = value.replace("-", "")
                key = rng.choice(("ssn", "SSN"))
                phrase = rng.choice(("my SSN is {}", "SSN: {}", "SSN {} on file"))
            else:
                phrase = rng.choice(_SSN_PHRASES)
            return _Item(value, entity, entity, key, phrase)
        phrase = rng.choice(_PHRASES[lang][entity])
        if entity == "email":
            value = rng.choice((fake.email, fake.free_email, fake.company_email))()
        elif entity == "phone":
            value = self._phone(locale)
        elif entity == "credit_card":
            value = self._card()
        elif entity == "iban":
            value = self._iban(locale)
            if rng.random() < 0.4:
                value = " ".join(value[i : i + 4] for i in range(0, len(value), 4))
        elif entity == "ip_address":
            value = self._ip()
        else:
            raise ValueError(entity)
        return _Item(value, entity, entity, key, phrase)

    def _phone(self, locale: str) -> str:
        region, fake = REGIONS[locale], self.fakers[locale]
        while True:
            raw = re.sub(r"\s*(?:x|ext\.?)\s*\d+$", "", fake.phone_number())
            try:
                number = phonenumbers.parse(raw, region)
            except phonenumbers.NumberParseException:
                continue
            if not phonenumbers.is_valid_number_for_region(number, region):
                continue  # faker's random digits: not a number anyone could have
            r = self.rng.random()
            if r < 0.5:
                return raw
            fmt = phonenumbers.PhoneNumberFormat
            style = fmt.INTERNATIONAL if r < 0.75 else fmt.NATIONAL if r < 0.9 else fmt.E164
            return phonenumbers.format_number(number, style)

    def _card(self) -> str:
        types: tuple[str, ...] = (
            "amex",
            "diners",
            "discover",
            "jcb15",
            "jcb16",
            "maestro",
            "mastercard",
        )
        types += ("mastercard", "visa13", "visa16", "visa19")
        digits = self.fakers["en_US"].credit_card_number(self.rng.choice(types))
        if self.rng.random() < 0.6:
            return digits
        sep = self.rng.choice((" ", "-"))
        widths: tuple[int, ...] = {15: (4, 6, 5), 14: (4, 6, 4)}.get(len(digits), ())
        if not widths:
            widths = tuple(4 for _ in range(len(digits) // 4))
            if len(digits) % 4:
                widths += (len(digits) % 4,)
        out: list[str] = []
        at = 0
        for w in widths:
            out.append(digits[at : at + w])
            at += w
        return sep.join(out)

    def _iban(self, locale: str) -> str:
        own = ("en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pt_BR")
        source = locale if locale in own else self.rng.choice(own)
        return self.fakers[source].iban()

    def _ip(self) -> str:
        fake, r = self.fakers["en_US"], self.rng.random()
        if r < 0.55:
            return fake.ipv4_public()
        if r < 0.75:
            return fake.ipv4_private()
        import ipaddress

        address = ipaddress.IPv6Address(fake.ipv6())
        return address.compressed if r < 0.9 else address.exploded

    # -- decoys

    def decoy(self, kind: str, locale: str, secret_key: str | None = None) -> _Item:
        rng, lang = self.rng, locale[:2]
        value = self._decoy_value(kind, locale)
        if kind == "placeholder":
            key = secret_key or rng.choice(_SECRET_KEYS[rng.choice(SECRET_KINDS[:-1])])
        else:
            key = rng.choice(_DECOY_KEYS[kind])
        localized = {"order_number": "order", "amount": "amount", "date": "date"}
        if kind in localized:
            phrase = rng.choice(_PHRASES[lang][localized[kind]])
        else:
            phrase = rng.choice(_DECOY_PHRASES[kind])
        return _Item(value, None, kind, key, phrase)

    def _decoy_value(self, kind: str, locale: str) -> str:
        rng, fake = self.rng, self.fakers[locale]
        if kind == "uuid":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if kind == "git_sha":
            return _rand(rng, _HEX, rng.choice((40, 40, 7, 12)))
        if kind == "sha256":
            return _rand(rng, _HEX, 64)
        if kind == "timestamp":
            moment = fake.date_time_between(_EARLIEST, _LATEST)
            style = rng.randrange(4)
            if style == 0:
                return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
            if style == 1:
                return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{rng.randrange(1000):03d}Z"
            if style == 2:
                return moment.strftime("%Y-%m-%d %H:%M:%S") + rng.choice(("+05:30", "-08:00"))
            return moment.strftime("%a, %d %b %Y %H:%M:%S GMT")
        if kind == "date":
            day = fake.date_between(_EARLIEST.date(), _LATEST.date())
            formats = {
                "en_US": ("%m/%d/%Y", "%B %d, %Y"),
                "en_GB": ("%d/%m/%Y", "%d %B %Y"),
                "de_DE": ("%d.%m.%Y", "%d.%m.%y"),
                "fr_FR": ("%d/%m/%Y",),
                "es_ES": ("%d/%m/%Y", "%d-%m-%Y"),
                "it_IT": ("%d/%m/%Y", "%d.%m.%Y"),
                "nl_NL": ("%d-%m-%Y",),
                "pt_BR": ("%d/%m/%Y",),
                "ja_JP": ("%Y/%m/%d", "%Y年%m月%d日"),
                "hi_IN": ("%d/%m/%Y", "%d-%m-%Y"),
            }
            return day.strftime(rng.choice((*formats[locale], "%Y-%m-%d")))
        if kind == "epoch":
            seconds = rng.randint(1_400_000_000, 1_900_000_000)
            return str(seconds) if rng.random() < 0.5 else str(seconds * 1000 + rng.randrange(1000))
        if kind == "version":
            a, b, c = rng.randrange(20), rng.randrange(30), rng.randrange(100)
            return rng.choice(
                (f"{a}.{b}.{c}", f"v{a}.{b}.{c}", f"v{a + 1}.0.0.{c}", f"{a}.{b}.{c}-rc.{c % 9}")
            )
        if kind == "amount":
            return self._amount(locale)
        if kind == "order_number":
            n = rng.randint(10**5, 10**10)
            return rng.choice(
                (
                    f"#{n}",
                    str(n),
                    f"INV-{rng.randint(2015, 2030)}-{n % 10**6:06d}",
                    f"PO-{n}",
                    f"1Z{_rand(rng, string.ascii_uppercase + string.digits, 16)}",
                    f"{n % 10**4:04d}-{rng.randrange(10**4):04d}-{rng.randrange(100):02d}",
                    f"ORD{n}",
                )
            )
        if kind == "isbn":
            return self._isbn()
        if kind == "non_luhn":
            while True:
                digits = rng.choice("3456") + _rand(rng, string.digits, 15)
                if not luhn_ok(digits):
                    break
            if rng.random() < 0.4:
                return " ".join(digits[i : i + 4] for i in range(0, 16, 4))
            return digits
        if kind == "bad_iban":
            good = self._iban(locale)
            check = int(good[2:4])
            bad = good[:2] + f"{(check + rng.randint(1, 96)) % 97:02d}" + good[4:]
            assert not iban_ok(bad)
            if rng.random() < 0.4:
                return " ".join(bad[i : i + 4] for i in range(0, len(bad), 4))
            return bad
        if kind == "data_uri":
            while True:
                data = b"\x89PNG\r\n\x1a\n" + rng.randbytes(rng.randint(60, 600))
                blob = base64.b64encode(data).decode()
                if not re.search(r"AKIA|ASIA|AIza|eyJ|ghp|xox", blob):
                    return "data:image/png;base64," + blob
        if kind == "placeholder":
            return rng.choice(PLACEHOLDERS)
        if kind == "oid":
            arcs = [
                "1.3.6.1.4.1.311",
                "1.2.840.113549.1.1",
                "2.16.840.1.101.3.4.2",
                "1.3.6.1.5.5.7.3",
            ]
            return rng.choice(arcs) + "." + ".".join(str(rng.randint(1, 30)) for _ in range(2))
        if kind == "mac":
            octets = [f"{b:02x}" for b in rng.randbytes(6)]
            sep = rng.choice((":", "-"))
            mac = sep.join(octets)
            return mac.upper() if rng.random() < 0.5 else mac
        if kind == "time":
            h, m, s = rng.randrange(24), rng.randrange(60), rng.randrange(60)
            return rng.choice((f"{h:02d}:{m:02d}:{s:02d}", f"{h:02d}:{m:02d}", f"{h}:{m:02d} PM"))
        if kind == "postcode":
            if locale == "en_US" and rng.random() < 0.5:
                return f"{rng.randint(10000, 99999)}-{rng.randint(1000, 9999)}"
            return fake.postcode()
        if kind == "quantity":
            n = rng.randint(1, 5000)
            return rng.choice((f"{n:,} units", f"{n / 10:.1f} kg", f"{n} ml", f"12 x {n} g"))
        if kind == "coordinates":
            lat, lon = float(fake.latitude()), float(fake.longitude())
            return rng.choice((f"{lat:.4f}, {lon:.4f}", f"{lat:.6f},{lon:.6f}"))
        raise ValueError(kind)

    def _amount(self, locale: str) -> str:
        rng = self.rng
        units = rng.randint(1, 9_999_999)
        cents = rng.randrange(100)
        us = f"{units:,}.{cents:02d}"
        eu = us.replace(",", "_").replace(".", ",").replace("_", ".")
        if locale == "hi_IN":
            head, tail = str(units)[:-3], str(units)[-3:]
            groups = [head[max(0, i - 2) : i] for i in range(len(head), 0, -2)][::-1]
            return "₹" + ",".join([*groups, tail] if head else [tail]) + f".{cents:02d}"
        if locale == "ja_JP":
            return f"¥{units * 10:,}"
        if locale == "fr_FR":
            return us.replace(",", "\u202f").replace(".", ",") + " €"
        if locale in ("de_DE", "es_ES", "it_IT", "nl_NL"):
            return rng.choice((f"{eu} €", f"€ {eu}", f"{eu} EUR"))
        if locale == "pt_BR":
            return f"R$ {eu}"
        if locale == "en_GB":
            return f"£{us}"
        return rng.choice((f"${us}", f"USD {us}", us))

    def _isbn(self) -> str:
        rng = self.rng
        if rng.random() < 0.5:
            body = rng.choice(("978", "979")) + _rand(rng, string.digits, 9)
            check = (10 - sum(int(c) * (3 if i % 2 else 1) for i, c in enumerate(body)) % 10) % 10
            full = body + str(check)
            if rng.random() < 0.5:
                return full
            return f"{full[:3]}-{full[3]}-{full[4:8]}-{full[8:12]}-{full[12]}"
        body = _rand(rng, string.digits, 9)
        total = sum(int(c) * (10 - i) for i, c in enumerate(body))
        check = (11 - total % 11) % 11
        full = body + ("X" if check == 10 else str(check))
        if rng.random() < 0.5:
            return full
        return f"{full[0]}-{full[1:4]}-{full[4:9]}-{full[9]}"


def isbn_ok(value: str) -> bool:
    digits = value.replace("-", "")
    if len(digits) == 13:
        return sum(int(c) * (3 if i % 2 else 1) for i, c in enumerate(digits)) % 10 == 0
    if len(digits) == 10:
        total = sum((10 if c == "X" else int(c)) * (10 - i) for i, c in enumerate(digits))
        return total % 11 == 0
    return False


# ---- writing documents --------------------------------------------------------


@dataclass
class _Writer:
    parts: list[str] = field(default_factory=list)
    pos: int = 0
    labels: list[Label] = field(default_factory=list)
    decoys: list[Decoy] = field(default_factory=list)

    def text(self, s: str) -> None:
        self.parts.append(s)
        self.pos += len(s)

    def value(self, item: _Item, shown: str | None = None) -> None:
        """The item's value (or its escaped form ``shown``), recorded where it lands."""
        s = item.value if shown is None else shown
        start = self.pos
        self.text(s)
        if item.entity is not None:
            self.labels.append(Label(start, self.pos, item.entity, item.kind))
        else:
            self.decoys.append(Decoy(start, self.pos, item.kind))

    def phrase(self, item: _Item, template: str | None = None) -> None:
        before, _, after = (template or item.phrase).partition("{}")
        self.text(before)
        self.value(item)
        self.text(after)

    def json_string(self, item: _Item) -> None:
        dumped = json.dumps(item.value, ensure_ascii=False)
        self.text('"')
        self.value(item, dumped[1:-1])
        self.text('"')

    def done(self, locale: str, shape: str) -> Document:
        return Document("".join(self.parts), self.labels, self.decoys, locale, shape)


def _is_multiline(item: _Item) -> bool:
    return "\n" in item.value


def _upper_snake(key: str) -> str:
    """``secretAccessKey``, ``x-api-key`` -> ``SECRET_ACCESS_KEY``, ``X_API_KEY``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key)).upper()


def _camel(key: str) -> str:
    """``DB_PASSWORD``, ``x-api-key`` -> ``dbPassword``, ``xApiKey``; camelCase stays."""
    first, *rest = _upper_snake(key).lower().split("_")
    return key if not rest and not key.isupper() else first + "".join(p.title() for p in rest)


def _dashed(item: _Item) -> _Item:
    if item.entity != "us_ssn" or "-" in item.value:
        return item
    v = item.value
    return _Item(f"{v[:3]}-{v[3:5]}-{v[5:]}", item.entity, item.kind, item.key, item.phrase)


class _Shapes:
    def __init__(self, values: _Values) -> None:
        self.v = values
        self.rng = values.rng

    def write(self, shape: str, locale: str, items: list[_Item]) -> Document:
        w = _Writer()
        getattr(self, "_" + shape)(w, locale, items)
        return w.done(locale, shape)

    def _sentences(self, w: _Writer, locale: str, items: Sequence[_Item], lang: str) -> None:
        fake = self.v.fakers[locale]
        for item in items:
            if self.rng.random() < 0.3:
                w.text(fake.sentence() + " ")
            template = item.phrase
            if item.entity in ("email", "phone", "credit_card", "iban", "ip_address"):
                template = self.rng.choice(_PHRASES[lang][item.entity])
            w.phrase(item, template)
            w.text(self.rng.choice((". ", ".\n", " — ", "; ", "。" if lang == "ja" else ". ")))

    def _chat(self, w: _Writer, locale: str, items: list[_Item]) -> None:
        lang = locale[:2]
        fake = self.v.fakers[locale]
        words = _PHRASES[lang]
        w.text(f"{self.rng.choice(words['hello'])} {fake.first_name()}. ")
        self._sentences(w, locale, items, lang)
        w.text(self.rng.choice(words["bye"]))

    def _ticket(self, w: _Writer, locale: str, items: list[_Item]) -> None:
        lang = locale[:2]
        fake = self.v.fakers[locale]
        ticket = self.v.decoy("order_number", locale)
        w.text("Ticket ")
        w.value(ticket)
        w.text(f"\nSubject: {fake.catch_phrase()}\nFrom: {fake.name()}\n")
        w.text(f"Priority: {self.rng.choice(('low', 'normal', 'high'))}\n\n")
        w.text(self.rng.choice(_PHRASES[lang]["hello"]) + "\n")
        self._sentences(w, locale, items, lang)
        w.text(
            f"\n{self.rng.choice(_PHRASES[lang]['bye'])}\n{fake.name()}\n{self.v.city(locale)}\n"
        )

    def _multilingual(self, w: _Writer, locale: str, items: list[_Item]) -> None:
        # Sentences in the locale's language, and some in English: a mixed prompt.
        lang = locale[:2]
        for item in items:
            language = "en" if self.rng.random() < 0.3 else lang
            self._sentences(w, locale, [item], language)
        w.text(self.v.fakers[locale].sentence())

    def _csv(self, w: _Writer, locale: str, items: list[_Item]) -> None:
        fake = self.v.fakers[locale]
        # A bare SSN needs "SSN" next to it; a column header is too far away.
        columns = [_dashed(i) for i in items if not _is_multiline(i)]
        w.text(",".join(["name", "city", *(i.key for i in columns)]) + "\n")
        rows = [columns]
        for _ in range(self.rng.randint(0, 2)):  # more rows: new values, same columns
            rows.append([self._again(i, locale) for i in columns])
        for row in rows:
            w.text(f"{fake.name()},{self.v.city(locale)}")
            for item in row:
                w.text(",")
                if any(c in item.value for c in ',"\n'):
                    w.text('"')
                    w.value(item, item.value.replace('"', '""'))
                    w.text('"')
                else:
                    w.value(item)
            w.text("\n")
        for item in items:
            if _is_multiline(item):
                w.text("\n# key for the import job\n")
                w.value(item)
                w.text("\n")

    def _again(self, item: _Item, locale: str) -> _Item:
        if item.entity is None:
            fresh = self.v.decoy(item.kind, locale)
        else:
            fresh = _dashed(self.v.entity(item.entity, locale, item.kind))
        return _Item(fresh.value, fresh.entity, fresh.kind, item.key, fresh.phrase)

    def _json(self, w: _Writer, locale: str, items: list[_Item]) -> None:
        fake = self.v.fakers[locale]
        indent = self.rng.choice((None, 2))
        nl = "\n" if indent else ""
        pad = "  " if indent else ""
        sep = ", " if indent is None else ","
        w.text("{" + nl)
        w.text(f'{pad}"name": {json.dumps(fake.name(), ensure_ascii=False)}{sep}{nl}')
        nested = self.rng.random() < 0.5
        if nested:
            w.text(f'{pad}"data": {{{nl}')
        inner = pad * 2 if nested else pad
        for n, item in enumerate(items):
            w.text(f'{inner}"{item.key}": ')
            if item.kind == "epoch":
                w.value(item)  # a number
            else:
                w.json_string(item)
            w.text((sep if n < len(items) - 1 else "") + nl)
        if nested:
            w.text(f"{pad}}}{nl}")
        w.text("}")

    def _env(self, w: _Writer, locale: str, items: list[_Item]) -> None:
        fake = self.v.fakers[locale]
        w.text(f"# {fake.company()} service config\nNODE_ENV=production\nPORT=8080\n")
        for item in items:
            name = _upper_snake(item.key)
            if item.kind == "generic_secret" and self.rng.random() < 0.3:
                user = fake.user_name()
                w.text(f"DATABASE_URL=postgres://{user}:")
                value = _password(self.rng, "-_.!*")
                w.value(_Item(value, "secrets", "generic_secret", item.key, item.phrase))
                w.text(f"@db.internal:5432/{fake.word()}\n")
                continue
            quote = (
                '"' if _is_multiline(item) or " " in item.value or self.rng.random() < 0.3 else ""
            )
            w.text(f"{name}={quote}")
            w.value(item)
            w.text(f"{quote}\n")

    def _log(self, w: _Writer, locale: str, items: list[_Item]) -> None:
        for item in items:
            stamp = self.v.decoy("timestamp", locale)
            w.value(stamp)
            level = self.rng.choice(("INFO", "WARN", "ERROR", "DEBUG"))
            w.text(f" {level} [{self.rng.choice(_SERVICES)}] ")
            if item.entity == "secrets" and item.kind not in NAMED_ONLY and self.rng.random() < 0.4:
                w.text("outgoing request headers={'Authorization': 'Bearer ")
                w.value(item)
                w.text("'}\n")
            elif _is_multiline(item):
                w.text("loaded signing key from env:\n")
                w.value(item)
                w.text("\n")
            else:
                w.text(f"{self.rng.choice(('handled', 'rejected', 'retrying'))} request ")
                w.text(f"{item.key}=")
                w.value(item)
                w.text(f" status={self.rng.choice((200, 401, 429, 500))}\n")

    def _code(self, w: _Writer, locale: str, items: list[_Item]) -> None:
        if self.rng.random() < 0.5:
            w.text("import os\n\nfrom openai import OpenAI\n\n")
            for item in items:
                name = _upper_snake(item.key)
                if _is_multiline(item):
                    w.text(f'{name} = """')
                    w.value(item)
                    w.text('"""\n')
                elif item.kind in ("openai_key", "placeholder") and self.rng.random() < 0.5:
                    w.text('client = OpenAI(api_key="')
                    w.value(item)
                    w.text('")\n')
                else:
                    w.text(f'{name} = "')
                    w.value(item)
                    w.text('"\n')
        else:
            w.text("const config = {\n")
            for item in items:
                name = _camel(item.key)
                w.text(f"  {name}: ")
                w.json_string(item)
                w.text(",\n")
            w.text("};\nexport default config;\n")


# Relative weights of planted entity types (secrets: one of twelve kinds each time).
_ENTITY_WEIGHTS = {
    "email": 1.0,
    "phone": 1.6,
    "credit_card": 1.0,
    "iban": 1.0,
    "us_ssn": 0.8,
    "ip_address": 0.8,
    "secrets": 4.0,
}
# Which planted values suit which shape (prose is for people, files for machines).
_PROSE = ("chat", "ticket", "multilingual")
_STRUCTURED_ONLY_DECOYS = ("data_uri",)


def _picker(rng: random.Random) -> Callable[[], str]:
    names, weights = list(_ENTITY_WEIGHTS), list(_ENTITY_WEIGHTS.values())
    return lambda: rng.choices(names, weights)[0]


def generate(seed: int, documents: int) -> list[Document]:
    """``documents`` documents; the same seed gives the same corpus. Each locale and
    shape pair appears once in every 80 documents; about a quarter are negatives."""
    values = _Values(seed)
    shapes = _Shapes(values)
    rng = values.rng
    pick = _picker(rng)
    corpus: list[Document] = []
    for i in range(documents):
        locale = LOCALES[i % len(LOCALES)]
        shape = SHAPES[(i // len(LOCALES)) % len(SHAPES)]
        negative = rng.random() < 0.25
        items: list[_Item] = []
        if not negative:
            count = rng.randint(1, 4)
            items = [values.entity(pick(), locale, shape=shape) for _ in range(count)]
        for _ in range(rng.randint(2, 5) if negative else rng.randint(0, 3)):
            kind = rng.choice(DECOY_KINDS)
            if kind in _STRUCTURED_ONLY_DECOYS and shape in _PROSE and rng.random() < 0.7:
                kind = "uuid"
            items.append(values.decoy(kind, locale))
        rng.shuffle(items)
        corpus.append(shapes.write(shape, locale, items))
    return corpus
