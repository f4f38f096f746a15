"""Template generators of task inputs with randomized slots, and of plausible answers for them.

Each input comes with what an agent following the task's prompt would answer (in the task's format),
what a model without the prompt would answer (plain prose), a reason, and a short role-swapped
conversation. They serve the built-in sample datasets, the synthesis demo's input files, and the
tiny agent model's pre-training corpus.

Every slot value belongs to exactly one split (``train``, ``heldout``, ``pretrain``) by a stable hash,
and every template uses at least one slot, so inputs of different splits never coincide.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Callable
from typing import Any

SPLITS = ("train", "heldout", "pretrain")
ENV_SPLIT = "env"  # genpi's own environment problems (genpi.environments.genpi_os); see ENV_SLOT_VALUES
END = "<END>"


def _split_of(value: str) -> str:
    return SPLITS[int(hashlib.sha256(value.encode()).hexdigest(), 16) % 3]


class Slots:
    """Draws slot values from the part of each pool that belongs to one split.

    The ``env`` split (:data:`ENV_SPLIT`) draws from :data:`ENV_SLOT_VALUES` instead: values that are in no pool,
    so its inputs never coincide with an input of any other split (pre-training, the study's synthesis).

    ``fresh=True`` (the ``pretrain`` split only) makes up a new value for every os slot (:func:`fresh_value`), never
    one of a pool or of :data:`ENV_SLOT_VALUES`: a model pre-trained on such inputs cannot get a command right by
    recalling a value it has seen, only by carrying the question's value into it. ``pieces``: make them of those
    pieces (:func:`fresh_value`)."""

    def __init__(self, rng: random.Random, split: str, fresh: bool = False, pieces: tuple[str, ...] | None = None):
        if fresh and split != "pretrain":
            raise ValueError("made-up slot values are for the pretrain split only")
        self.rng = rng
        self.split = split
        self.fresh = fresh
        self.pieces = pieces

    def pick(self, pool: list[str]) -> str:
        if self.fresh or self.split == ENV_SPLIT:
            name = next((k for k, v in globals().items() if v is pool), None)  # the pool's name, e.g. "DIRS"
            if self.fresh and name in ENV_SLOT_VALUES:
                return fresh_value(self.rng, name, self.pieces)
        if self.split == ENV_SPLIT:
            if name not in ENV_SLOT_VALUES:
                raise ValueError("the env split has slot values for the os task's pools only")
            return self.rng.choice(ENV_SLOT_VALUES[name])
        mine = [v for v in pool if _split_of(v) == self.split] or pool
        return self.rng.choice(mine)

    def num(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# -- OS --------------------------------------------------------------------------------------
DIRS = [f"/{a}/{b}" for a in ("var", "opt", "srv", "home/dev", "data", "usr/local") for b in
        ("log", "app", "backup", "reports", "cache", "projects", "static", "archive", "tmp", "share")]
EXTS = ["txt", "log", "csv", "py", "json", "conf", "md", "sh", "yaml", "xml", "html", "bak"]
WORDS = ["error", "warning", "timeout", "failed", "success", "denied", "started", "admin", "root", "disk",
         "memory", "network", "retry", "critical", "debug"]
USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar",
         "peggy", "trent", "victor", "walter"]
PROCS = ["nginx", "sshd", "python3", "cron", "postgres", "redis-server", "node", "java", "dockerd", "bash", "mysqld"]
FILES = ["notes", "report", "config", "data", "access", "summary", "todo", "results", "inventory", "users"]
SHELLS = ["/bin/bash", "/bin/sh", "/usr/sbin/nologin", "/bin/zsh", "/bin/false"]


# The "env" split's slot values for the os templates: none of them is in a pool above, so no corpus input (tiny agent
# pre-training, the study's synthesis) ever held one. Directories lie where a sandboxed machine can write.
ENV_SLOT_VALUES = {
    "DIRS": [f"/{a}/{b}" for a in ("srv/site", "opt/tools", "home/qa", "var/spool")
             for b in ("ledger", "inbox", "exports", "metrics", "uploads")],
    "EXTS": ["tsv", "ini", "dat", "rst", "toml", "cfg", "out", "jsonl"],
    "WORDS": ["alert", "panic", "refused", "expired", "offline", "fatal", "queued", "blocked"],
    "USERS": ["kevin", "laura", "mike", "nina", "paul", "quinn", "rita", "sara", "tina", "uma", "wade", "xena",
              "yusuf", "zoe"],
    "PROCS": ["memcached", "haproxy", "rsyslogd", "gunicorn", "celery", "consul", "etcd", "squid"],
    "FILES": ["ledger", "backlog", "metrics", "digest", "roster", "catalog", "journal", "manifest"],
    "SHELLS": ["/bin/dash", "/usr/bin/fish", "/bin/tcsh", "/bin/ksh", "/usr/bin/zsh"],
}


_CONSONANTS, _VOWELS = "bcdfghjklmnprstvwz", "aeiou"


OS_OBSERVATION = "The terminal printed:\n"  # how the os corpus's user turns report a command's output


def with_terminal_newline(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its os observations ending in a newline, as a real terminal's output does (and as genpi's
    own problems print it): the corpus's observations end without one."""
    conv = [{**t, "content": t["content"] + "\n"} if t["role"] == "user" and t["content"].startswith(OS_OBSERVATION)
            and not t["content"].endswith("\n") else t for t in record["teacher_output_conv"]]
    return {**record, "teacher_output_conv": conv}


def made_up_word(rng: random.Random, lo: int = 2, hi: int = 3) -> str:
    """A pronounceable made-up word of ``lo``..``hi`` syllables (``kabo``, ``tevrisu``)."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + (rng.choice(_CONSONANTS) if rng.random() < 0.4 else "")
                   for _ in range(rng.randint(lo, hi)))


@functools.cache
def _taken() -> frozenset[str]:
    """Every slot value of the os pools and of :data:`ENV_SLOT_VALUES`."""
    pools = [globals()[name] for name in ENV_SLOT_VALUES] + list(ENV_SLOT_VALUES.values())
    return frozenset(v for pool in pools for v in pool)


@functools.cache
def prompt_words() -> tuple[str, ...]:
    """English words (3-9 lowercase letters) of the four tasks' prompts, less every slot value of the pools and of
    :data:`ENV_SLOT_VALUES`: real words, so that made-up values look like the words a question names too."""
    import re

    from genpi.tasks.base import TASK_NAMES, builtin_task

    text = " ".join(turn["content"] for name in TASK_NAMES for turn in builtin_task(name).prompt_turns)
    return tuple(sorted(set(re.findall(r"\b[a-z]{3,9}\b", text)) - _taken_words()))


@functools.cache
def _taken_words() -> frozenset[str]:
    """Every slot value of the os pools and of :data:`ENV_SLOT_VALUES`, and every part of their paths."""
    return _taken() | {part for value in _taken() for part in value.split("/")}


def fresh_value(rng: random.Random, pool_name: str, pieces: tuple[str, ...] | None = None) -> str:
    """A made-up value for the os slot pool ``pool_name`` (``DIRS``, ``EXTS``, ...), of the pool's shape and in
    none of the pools nor :data:`ENV_SLOT_VALUES`. Its words are half made up (:func:`made_up_word`), half real
    (:func:`prompt_words`); or, given ``pieces`` (e.g. a tokenizer's alphabetic tokens), each word joins 1 to 3
    pieces drawn uniformly, so that any word the pieces spell is a value the model may meet."""
    taken, real, taken_words = _taken(), prompt_words(), _taken_words()

    def word(lo: int = 2, hi: int = 3) -> str:
        while pieces:  # never a whole word of a pool's or the env split's values
            made = "".join(rng.choice(pieces) for _ in range(rng.randint(1, hi)))
            if made not in taken_words:
                return made
        return rng.choice(real) if rng.random() < 0.5 else made_up_word(rng, lo, hi)

    while True:
        if pool_name == "DIRS":
            top = rng.choice(["var", "opt", "srv", "data", "usr/local", "home/" + word(1, 2), word(1, 2)])
            value = f"/{top}/{word()}" + (f"/{word(1, 2)}" if rng.random() < 0.3 else "")
        elif pool_name == "EXTS":
            value = word(1, 1)[:rng.randint(2, 4)]
        elif pool_name == "SHELLS":
            value = rng.choice(["/bin/", "/usr/bin/", "/usr/sbin/"]) + word(1, 2)
        elif pool_name == "PROCS":
            value = word(1, 3) + rng.choice(["", "", "d", "-server", "3"])
        else:  # WORDS, USERS, FILES
            value = word(1, 3)
        if value not in taken and len(value) > 1:
            return value


def copy_drill(n: int, seed: int, pieces: tuple[str, ...] | None = None) -> list[list[dict[str, str]]]:
    """``n`` chats in which the assistant repeats 2-5 made-up values the user gave: the cheapest lesson in carrying
    text from the input into the answer, which the os task needs (paths, names, numbers) and which a tiny model
    does not pick up from the task's corpus alone. ``pieces``: values made of them (:func:`fresh_value`)."""
    rng = random.Random(f"copy:{seed}")
    names = sorted(ENV_SLOT_VALUES)
    out = []
    for _ in range(n):
        out.append(repeat_chat([fresh_value(rng, rng.choice(names), pieces) for _ in range(rng.randint(2, 5))]))
    return out


def repeat_chat(values: list[str]) -> list[dict[str, str]]:
    """One copy-drill chat: the user gives ``values``, the assistant repeats them."""
    return [_turn("user", "Repeat these exactly: " + " ".join(values)), _turn("assistant", " ".join(values))]


def _os_bash(think: str, code: str) -> str:
    return f"Think: {think}\n\nAct: bash\n\n```bash\n{code}\n```"


def _os_example(s: Slots) -> dict[str, Any]:
    return os_example_with_slots(s)[0]


def os_example_with_slots(s: Slots) -> tuple[dict[str, Any], dict[str, Any]]:
    """An ``os`` record and the slot values it was made of (``kind`` = the template, 0..8), so that a problem whose
    machine state fits the question can be built around it (:mod:`genpi.environments.genpi_os`)."""
    d, ext, w, u, p = s.pick(DIRS), s.pick(EXTS), s.pick(WORDS), s.pick(USERS), s.pick(PROCS)
    name = sh = None
    f = f"{d}/{s.pick(FILES)}.{ext}"
    n = s.num(0, 400)
    kind = s.rng.randrange(9)
    if kind == 0:
        x = f"How many files with the extension .{ext} are there in {d}, including subfolders?"
        code, out, final = f'find {d} -type f -name "*.{ext}" | wc -l', str(n), f"answer({n})"
        think = f"I should find every regular file ending in .{ext} under {d} and count them."
        plain = f"You can count them with the find command, for example `find {d} -name '*.{ext}'`, and pipe it to wc."
    elif kind == 1:
        x = f"What is the total size of {d} in kilobytes? Answer with the number only."
        code, out, final = f"du -sk {d} | cut -f1", str(n * 37), f"answer({n * 37})"
        think = f"du -sk prints the size of {d} in kilobytes; I keep only the number."
        plain = f"The size of a folder like {d} depends on its contents. Running `du -sh` will show it in a readable form."
    elif kind == 2:
        name = s.pick(FILES)
        x = f"Create a folder named {name} inside {d} and put an empty file called {u}.{ext} in it."
        code, out, final = f"mkdir -p {d}/{name} && touch {d}/{name}/{u}.{ext} && ls {d}/{name}", f"{u}.{ext}", "finish"
        think = "I create the folder with mkdir -p, then the empty file with touch, and list the folder to check."
        plain = "Sure! First make the folder with mkdir, then create the file with touch. That's all there is to it."
    elif kind == 3:
        x = f"How many lines of {f} contain the word '{w}'?"
        code, out, final = f"grep -c -w '{w}' {f}", str(n), f"answer({n})"
        think = f"grep -c counts the matching lines of {f}; -w matches the whole word {w}."
        plain = f"To see lines with '{w}', open {f} in a text editor and search for it, or use grep."
    elif kind == 4:
        x = f"Which user owns the file {f}?"
        code, out, final = f"stat -c %U {f}", u, f"answer({u})"
        think = f"stat can print the owner of {f} directly with the %U format."
        plain = "The owner of a file is shown by ls -l in the third column. It is often root for system files."
    elif kind == 5:
        x = f"How many processes named {p} are running right now?"
        code, out, final = f"pgrep -c -x {p}", str(n % 17), f"answer({n % 17})"
        think = f"pgrep -c -x counts the processes whose name is exactly {p}."
        plain = f"You can look at running processes with top or ps aux and look for {p} in the list."
    elif kind == 6:
        x = f"Change the permissions of {f} so that only its owner, {u}, can read and write it."
        code, out, final = f"chmod 600 {f} && stat -c '%a %U' {f}", f"600 {u}", "finish"
        think = "Mode 600 gives read and write to the owner only; I set it and print the mode to check."
        plain = "Permissions are changed with chmod. Mode 600 is a common choice for private files."
    elif kind == 7:
        sh = s.pick(SHELLS)
        x = f"How many accounts on this machine use {sh} as their login shell? (user {u} asked)"
        code, out, final = f"grep -c ':{sh}$' /etc/passwd", str(n % 23), f"answer({n % 23})"
        think = f"The login shell is the last field of /etc/passwd, so I count lines ending in {sh}."
        plain = f"Login shells are listed in /etc/passwd. Many service accounts use nologin instead of {sh}."
    else:
        x = f"What is the name of the largest file directly inside {d}? Give only the file name."
        name = f"{s.pick(FILES)}.{ext}"
        code, out, final = f"ls -S -p {d} | grep -v / | head -n 1", name, f"answer({name})"
        think = "ls -S sorts by size, largest first; I drop folders and keep the first line."
        plain = "You can sort files by size with ls -S. The largest one will be listed first."
    first = _os_bash(think, code)
    last_think = "The output gives the answer." if final.startswith("answer") else "The output shows that the task is done."
    last = f"Think: {last_think}\n\nAct: {final}"
    conv = [_turn("assistant", first), _turn("user", OS_OBSERVATION + out), _turn("assistant", last),
            _turn("user", END)]
    reason = ("Without the instructions the model explains in prose and names commands loosely; with them it acts as "
              "the shell agent: a 'Think:' line, then exactly one 'Act: bash' with a runnable code block, so the "
              "terminal can execute it and the answer can be checked.")
    record = {"pseudo_input": x, "teacher_output_single": first, "student_output_single": plain, "reason": reason,
              "teacher_output_conv": conv}
    return record, {"kind": kind, "dir": d, "ext": ext, "word": w, "user": u, "proc": p, "file": f, "name": name,
                    "shell": sh, "code": code, "final": final}


# -- WebShop ------------------------------------------------------------------------------------
PRODUCTS = ["running shoes", "cotton t-shirt", "hiking backpack", "wireless earbuds", "yoga mat", "coffee grinder",
            "desk lamp", "rain jacket", "water bottle", "phone case", "wool socks", "bath towel", "pillow cover",
            "travel mug", "laptop sleeve", "face moisturizer", "dog leash", "throw blanket"]
COLORS = ["black", "navy blue", "red", "forest green", "white", "gray", "beige", "pink", "purple", "mustard yellow"]
SIZES = ["small", "medium", "large", "x-large", "size 8", "size 10", "12 ounce", "queen", "one size", "2 pack"]
MATERIALS = ["organic cotton", "stainless steel", "bamboo", "recycled polyester", "leather", "silicone", "merino wool"]


def _code(s: Slots) -> str:
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
    return "B0" + "".join(s.rng.choice(letters) for _ in range(8))


def _webshop_example(s: Slots) -> dict[str, Any]:
    prod, color, size, mat = s.pick(PRODUCTS), s.pick(COLORS), s.pick(SIZES), s.pick(MATERIALS)
    price = s.num(12, 90)
    kind = s.rng.randrange(4)
    if kind == 0:
        x = f"i need a {color} {prod} in {size}, and price lower than {price}.00 dollars"
        kw = f"{color} {prod} {size}"
    elif kind == 1:
        x = f"i am looking for a {mat} {prod}, {color} color, and price lower than {price}.00 dollars"
        kw = f"{mat} {prod} {color}"
    elif kind == 2:
        x = f"find me a {prod} made of {mat} that comes in {size}, and price lower than {price}.00 dollars"
        kw = f"{mat} {prod} {size}"
    else:
        x = f"buy a {color} {mat} {prod} for under {price} dollars"
        kw = f"{color} {mat} {prod}"
    instr = f"WebShop [SEP] Instruction: [SEP] {x} [SEP] Search"
    pseudo = f"{instr}\nAvailable Actions:\n{{\"has_search_bar\": true, \"clickables\": [\"search\"]}}"
    first = f"Thought:\nI should search for the key attributes: {kw}.\n\nAction:\nsearch[{kw}]"
    codes = [_code(s) for _ in range(3)]
    pick_price = max(5, price - s.num(1, 10))
    results = (f"Observation:\nInstruction: [SEP] {x} [SEP] Back to Search [SEP] Page 1 (Total results: 50) [SEP] Next > "
               f"[SEP] {codes[0]} [SEP] {color.title()} {prod.title()}, {mat.title()} [SEP] ${pick_price}.99 [SEP] {codes[1]} "
               f"[SEP] {prod.title()} Deluxe [SEP] ${price + 25}.00 [SEP] {codes[2]} [SEP] Basic {prod.title()} [SEP] $7.50\n\n"
               f"Available Actions:\n{{\"has_search_bar\": false, \"clickables\": [\"back to search\", \"next >\", "
               f"\"{codes[0].lower()}\", \"{codes[1].lower()}\", \"{codes[2].lower()}\"]}}")
    page = (f"Observation:\nInstruction: [SEP] {x} [SEP] Back to Search [SEP] < Prev [SEP] size [SEP] {size} [SEP] color "
            f"[SEP] {color} [SEP] {color.title()} {prod.title()} [SEP] Price: ${pick_price}.99 [SEP] Buy Now\n\n"
            f"Available Actions:\n{{\"has_search_bar\": false, \"clickables\": [\"back to search\", \"< prev\", \"{size}\", "
            f"\"{color}\", \"buy now\"]}}")
    conv = [
        _turn("assistant", first), _turn("user", results),
        _turn("assistant", f"Thought:\n{codes[0]} matches the {color} {prod} and costs less than {price} dollars.\n\n"
                           f"Action:\nclick[{codes[0].lower()}]"),
        _turn("user", page),
        _turn("assistant", f"Thought:\nI select the size {size} that the instruction asks for.\n\nAction:\nclick[{size}]"),
        _turn("user", f"Observation:\nYou have selected {size}. [SEP] Buy Now\n\nAvailable Actions:\n"
                      f"{{\"has_search_bar\": false, \"clickables\": [\"back to search\", \"< prev\", \"buy now\"]}}"),
        _turn("assistant", "Thought:\nThe options are set and the price fits, so I buy it.\n\nAction:\nclick[buy now]"),
        _turn("user", f"Thank you for shopping. {END}"),
    ]
    plain = (f"A good {prod} in {color} can be found at most online stores. Look for {mat} if you want quality, and "
             f"compare a few options under {price} dollars before you decide.")
    reason = ("With the instructions the model behaves as the shopping agent: it writes a short 'Thought:' and a single "
              "valid 'Action:' such as search[...] with the instruction's attributes; without them it gives general "
              "shopping advice that the website cannot execute.")
    return {"pseudo_input": pseudo, "teacher_output_single": first, "student_output_single": plain, "reason": reason,
            "teacher_output_conv": conv}


# -- Mind2Web -----------------------------------------------------------------------------------
SITES = ["a car rental site", "an airline site", "a recipe site", "a concert ticket site", "a hotel booking site",
         "a library catalog", "a job board", "an electronics store", "a restaurant reservation site", "a museum site"]
CITIES = ["Brooklyn", "Seattle", "Austin", "Denver", "Boston", "Chicago", "Miami", "Portland", "Atlanta", "Phoenix",
          "Madison", "Tucson"]
ITEMS = ["SUV", "one-way flight", "vegan lasagna", "jazz concert", "double room", "mystery novel", "data analyst job",
         "4K monitor", "table for two", "guided tour"]


def _m2w_example(s: Slots) -> dict[str, Any]:
    site, city, item = s.pick(SITES), s.pick(CITIES), s.pick(ITEMS)
    day = s.num(1, 28)
    kind = s.rng.randrange(3)
    ids = list(range(6))
    s.rng.shuffle(ids)
    search = f"<input id={ids[0]} text search or enter location />"
    button = f"<button id={ids[1]}> Search </button>"
    date = f"<select id={ids[2]} date> <option> Today </option> <option> {day} </option> </select>"
    link = f"<a id={ids[3]}> Deals </a>"
    signin = f"<button id={ids[4]}> Sign in </button>"
    html = (f"<html> <div> <header> {signin} {link} </header> <main> <form> {search} {date} {button} </form> </main> "
            "</div> </html>")
    if kind == 0:
        task = f"Find a {item} in {city} on {site}."
        opts, answer, act, value, why = [link, search, signin], "C", "TYPE", city, f"the location box is where {city} goes"
    elif kind == 1:
        task = f"Book a {item} in {city} for day {day} of next month on {site}."
        opts, answer, act, value, why = [search, date, link], "C", "SELECT", str(day), f"the date menu sets day {day}"
    else:
        task = f"Look up current deals for a {item} on {site}."
        opts, answer, act, value, why = [signin, button, link], "D", "CLICK", None, "the Deals link leads to the offers"
    letters = "BCD"
    choices = "A. None of the above\n" + "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(opts))
    pseudo = (f"'''\n{html}\n'''\n\nBased on the HTML webpage above, try to complete the following task:\nTask: {task}\n"
              f"Previous actions:\nNone\nWhat should be the next action? Please select from the following choices "
              f"(If the correct action is not in the page above, please select A. 'None of the above'):\n\n{choices}")
    first = f"Thought: The next step is clear: {why}.\nAnswer: {answer}.\nAction: {act}"
    if value is not None:
        first += f"\nValue: {value}"
    plain = (f"To do this, go to {site}, use the search feature and browse the results for a {item}. "
             "Many sites also let you filter by date and location.")
    conv = [_turn("assistant", first),
            _turn("user", f"The page changed and shows results for {item}. Task finished. {END}")]
    reason = ("The instructions make the model answer as the web agent: one option letter from the list, the action "
              "(CLICK, TYPE or SELECT) and a value when needed; without them it describes how a person would use the site.")
    return {"pseudo_input": pseudo, "teacher_output_single": first, "student_output_single": plain, "reason": reason,
            "teacher_output_conv": conv}


# -- KG -------------------------------------------------------------------------------------------
PEOPLE = ["Marie Curie", "Alan Turing", "Ada Lovelace", "Nelson Mandela", "Frida Kahlo", "Miles Davis", "Jane Austen",
          "Akira Kurosawa", "Serena Williams", "Carl Sagan", "Toni Morrison", "Yo-Yo Ma", "Grace Hopper", "Pablo Neruda",
          "Wangari Maathai", "Satyajit Ray", "Ella Fitzgerald", "Gabriel Garcia Marquez", "Rosalind Franklin",
          "Haruki Murakami", "Chinua Achebe", "Simone de Beauvoir", "Katherine Johnson", "Ludwig van Beethoven",
          "Hayao Miyazaki", "Zaha Hadid", "Srinivasa Ramanujan", "Billie Holiday", "Leo Tolstoy", "Mae Jemison"]
PLACES = ["Lake Victoria", "Mount Rainier", "the Danube", "Kyoto", "Patagonia", "the Sahara", "Reykjavik", "Lima",
          "the Great Barrier Reef", "Tasmania", "Lake Baikal", "the Andes", "Bavaria", "Yosemite", "the Nile delta",
          "Quebec", "Sicily", "the Gobi", "Crete", "Lake Titicaca", "Hokkaido", "the Alps", "Zanzibar", "Iceland"]
RELATIONS = {"award": "award.award_winner.awards_won", "spouse": "people.person.spouse_s",
             "born": "people.person.place_of_birth", "works": "book.author.works_written",
             "contains": "location.location.contains", "founded": "organization.organization.founders"}


def _kg_example(s: Slots) -> dict[str, Any]:
    person, place = s.pick(PEOPLE), s.pick(PLACES)
    kind = s.rng.randrange(6)
    if kind == 4:
        q, ent, rel = f"which books were written by {person}?", person, RELATIONS["works"]
    elif kind == 5:
        q, ent, rel = f"which organizations were founded by {person}?", person, RELATIONS["founded"]
    elif kind == 0:
        q, ent, rel = f"what awards did {person} win?", person, RELATIONS["award"]
    elif kind == 1:
        q, ent, rel = f"who was the spouse of {person}?", person, RELATIONS["spouse"]
    elif kind == 2:
        q, ent, rel = f"which places are located within {place}?", place, RELATIONS["contains"]
    else:
        q, ent, rel = f"where was {person} born?", person, RELATIONS["born"]
    q = s.rng.choice(["{q}", "tell me {q}", "i would like to know {q}", "can you find out {q}"]).format(q=q)
    pseudo = f"Question: {q}\nEntities: [{ent}]"
    first = f"Thought: I should see which relations {ent} has before following one.\nAction: get_relations({ent})"
    rels = sorted({rel, RELATIONS["born"], RELATIONS["contains"], "common.topic.notable_types"})
    conv = [_turn("assistant", first), _turn("user", f"Observation: [{', '.join(rels)}]"),
            _turn("assistant", f"Thought: {rel} answers the question.\nAction: get_neighbors({ent}, {rel})"),
            _turn("user", "Observation: variable #0, which are instances of common.topic"),
            _turn("assistant", "Thought: #0 holds the entities the question asks for.\nFinal Answer: #0"),
            _turn("user", END)]
    plain = f"That is a good question about {ent}. From what I remember, there are several facts worth knowing."
    reason = ("The instructions turn the model into a tool user: it calls get_relations / get_neighbors with exact "
              "arguments and ends with 'Final Answer: #N'; without them it answers from memory in prose.")
    return {"pseudo_input": pseudo, "teacher_output_single": first, "student_output_single": plain, "reason": reason,
            "teacher_output_conv": conv}


GENERATORS: dict[str, Callable[[Slots], dict[str, Any]]] = {
    "os": _os_example, "webshop": _webshop_example, "m2w": _m2w_example, "kg": _kg_example,
}


def generate_examples(task_name: str, n: int, seed: int, split: str = "train", fresh: bool = False,
                      pieces: tuple[str, ...] | None = None, terminal_newline: bool = False) -> list[dict[str, Any]]:
    """``n`` distinct records (the 7 record columns; ``context_id``/``context`` left empty) for one split;
    ``fresh``: made-up os slot values (:class:`Slots`; the pretrain split only), of ``pieces`` if given;
    ``terminal_newline``: os observations end in a newline (:func:`with_terminal_newline`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    if fresh and task_name != "os":
        raise ValueError(f"only the os task has made-up slot values, not {task_name}")
    rng = random.Random(f"{task_name}:{seed}:{split}" + (":fresh" if fresh else ""))
    slots = Slots(rng, split, fresh, pieces)
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for _ in range(n * 50):
        ex = GENERATORS[task_name](slots)
        key = " ".join(ex["pseudo_input"].lower().split())
        if key in seen:
            continue
        seen.add(key)
        if terminal_newline and task_name == "os":
            ex = with_terminal_newline(ex)
        out.append({"context_id": "", "context": "", **ex})
        if len(out) == n:
            break
    return out
