"""ember's built-in text sets, written for ember: varied English prose, dialogue, code and data, so that
calibration sees the kinds of activations a general assistant model produces. `ember-mix` calibrates;
`ember-heldout` (disjoint from it) measures quality after quantization."""

from __future__ import annotations

EMBER_MIX = [
    """The river town woke slowly. Fishermen pulled their boats onto the gravel, the baker propped open his
door to let the heat out, and a line of schoolchildren crossed the old stone bridge in pairs, counting
the lamp posts aloud. By nine the market square was full: crates of pears, bundles of dried lavender,
copper pans that caught the light and threw it back across the cobbles.""",
    """def merge_sorted(a: list[int], b: list[int]) -> list[int]:
    \"\"\"Merge two sorted lists into one sorted list in O(len(a) + len(b)).\"\"\"
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out


if __name__ == "__main__":
    print(merge_sorted([1, 4, 9], [2, 3, 10, 11]))""",
    """User: Can you explain what a hash table is, in simple terms?
Assistant: Sure. A hash table stores items in an array of buckets. To put a key in, you run it through a
hash function that turns it into a number, and that number picks the bucket. Looking the key up later
repeats the same steps, so on average both inserting and finding take constant time. When two keys land
in the same bucket, the table keeps a short list there, or probes for the next free slot.""",
    """Quarterly results, in millions of dollars: revenue 412.7 (up 8.3% year over year), gross margin 61.2%,
operating expenses 188.4, net income 57.9. Cash and equivalents ended the quarter at 1,204.5 after a
share buyback of 150.0. Guidance for the next quarter: revenue between 420 and 435, with margins roughly
flat. The board declared a dividend of $0.21 per share, payable on March 14.""",
    """SELECT c.name, COUNT(o.id) AS orders, SUM(o.total) AS spent
FROM customers AS c
JOIN orders AS o ON o.customer_id = c.id
WHERE o.created_at >= DATE '2024-01-01'
GROUP BY c.name
HAVING COUNT(o.id) > 3
ORDER BY spent DESC
LIMIT 20;""",
    """Photosynthesis turns light into chemical energy. In the chloroplasts of a leaf, chlorophyll absorbs
mostly red and blue light; the energy splits water molecules, releasing oxygen, and drives the synthesis
of ATP and NADPH. In the Calvin cycle these carriers power the fixation of carbon dioxide into
three-carbon sugars, which the plant assembles into glucose, starch and cellulose.""",
    """{"id": 4821, "status": "shipped", "items": [{"sku": "KB-204", "qty": 2, "price": 49.99},
{"sku": "MS-118", "qty": 1, "price": 24.5}], "address": {"city": "Lyon", "zip": "69002", "country": "FR"},
"tracking": null, "gift": false, "notes": "Leave at the front desk if nobody answers."}""",
    """Dear Ms. Okafor,
Thank you for your letter of 3 May. I am sorry that the replacement part arrived damaged. We have sent a
second one by express courier, and it should reach you by Thursday. Please keep the damaged part; there
is no need to return it. If anything else goes wrong, call me directly on the number below.
Kind regards,
Tomas Lindqvist, Customer Care""",
    """#include <stdio.h>

static unsigned long fib(unsigned n) {
    unsigned long a = 0, b = 1;
    while (n--) {
        unsigned long t = a + b;
        a = b;
        b = t;
    }
    return a;
}

int main(void) {
    for (unsigned i = 0; i < 10; i++) printf("%u: %lu\\n", i, fib(i));
    return 0;
}""",
    """How to repot a houseplant: water it the day before so the root ball holds together. Choose a pot one
size larger with a drainage hole. Tip the plant out, loosen circling roots with your fingers, and set it
at the same depth as before. Fill around it with fresh mix, press lightly, water until it drains, and
keep it out of direct sun for a week while the roots settle.""",
    """In 1851 the Great Exhibition opened in London's Hyde Park inside the Crystal Palace, a building of
iron and glass designed by Joseph Paxton. More than six million visitors came to see machines, textiles,
scientific instruments and curiosities from around the world; the profits funded museums and colleges in
South Kensington that still stand today.""",
    """const debounce = (fn, ms = 250) => {
  let timer;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn.apply(this, args), ms);
  };
};

window.addEventListener("resize", debounce(() => {
  console.log(`width=${window.innerWidth} height=${window.innerHeight}`);
}));""",
]

EMBER_HELDOUT = [
    """The committee met on Tuesday to review the proposal for a new cycle lane along the harbour road.
Residents raised concerns about parking and deliveries, while the cycling club presented counts showing
that traffic on the route had doubled in two years. The chair asked the engineers to return next month
with a design that keeps a loading bay outside the pharmacy.""",
    """class LRUCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: dict[str, int] = {}

    def get(self, key: str) -> int | None:
        if key not in self.items:
            return None
        value = self.items.pop(key)
        self.items[key] = value
        return value

    def put(self, key: str, value: int) -> None:
        self.items.pop(key, None)
        self.items[key] = value
        if len(self.items) > self.capacity:
            self.items.pop(next(iter(self.items)))""",
    """User: What is the difference between weather and climate?
Assistant: Weather is what the atmosphere does over hours or days: today's rain, tomorrow's wind. Climate
is the pattern of weather over decades, such as the average temperature of a region in July or how often
it floods. A single cold week says little about climate; thirty years of records say a great deal.""",
    """Recipe for a simple flatbread: mix 300 g of flour, a teaspoon of salt, 180 ml of warm water and two
tablespoons of olive oil into a soft dough. Knead for five minutes, rest it for half an hour, then divide
into six balls. Roll each thin and cook in a dry, very hot pan for about a minute a side, until it puffs
and shows brown spots.""",
    """fn parse_pairs(input: &str) -> Vec<(String, i64)> {
    input
        .lines()
        .filter_map(|line| {
            let (k, v) = line.split_once('=')?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}""",
    """The telescope's primary mirror is 6.5 metres across, made of eighteen hexagonal segments of beryllium
coated in a thin layer of gold, which reflects infrared light well. Because the instrument observes heat,
it must stay extremely cold, so a five-layer sunshield the size of a tennis court blocks the light and
warmth of the Sun, Earth and Moon.""",
    """Meeting notes, 12 June. Attendees: Priya, Marcus, Lena, Daniel. 1) Release 2.4 slips one week because
the migration script failed on the staging copy of the largest tenant. 2) Marcus will add a dry-run flag
and a row-count check. 3) Lena reported that support tickets fell 18% after the new onboarding emails.
Next meeting: 19 June, same time.""",
    """<ul class="menu">
  <li><a href="/">Home</a></li>
  <li><a href="/docs/getting-started">Getting started</a></li>
  <li><a href="/blog?page=2" rel="next">Older posts</a></li>
</ul>
<p>Questions? Write to <a href="mailto:help@example.org">help@example.org</a>.</p>""",
]

BUILTIN_SETS: dict[str, list[str]] = {"ember-mix": EMBER_MIX, "ember-heldout": EMBER_HELDOUT}
DEFAULT_CALIBRATION_SET = "ember-mix"
HELD_OUT_SET = "ember-heldout"
