"""Templated narrative filler: varied, seeded prose for the built-in corpus and the built-in BABILong haystack.

A document is a few scenes; a scene has a setting, one to three characters, weather or time of day,
actions, thoughts and dialogue, drawn from many templates and word lists. The grammar never uses a bAbI
actor name, a room, place or object word, a compass direction, or a movement verb followed by "to the", so
filler can never state or contradict a bAbI fact (babilong.md §8.3). `FORBIDDEN_WORDS` is checked by a test.

Document `index` of (side, seed) always has the same text: the train side (pretraining corpus, BABILong
training sets) and the test side (BABILong evaluation sets) are different random streams.
"""

from __future__ import annotations

import random

FILLER_VERSION = 1

FORBIDDEN_WORDS = {
    "mary", "john", "daniel", "sandra", "bill", "fred", "jeff", "julie",
    "bathroom", "bedroom", "garden", "hallway", "kitchen", "office", "cinema", "park", "school",
    "apple", "football", "milk", "north", "south", "east", "west",
    "moved", "went", "journeyed", "travelled",
}

FIRST_NAMES = [
    "Ada", "Alder", "Amos", "Anika", "Arlo", "Beatrix", "Bram", "Cassia", "Cedric", "Clara", "Corin", "Dalia",
    "Edwin", "Elsa", "Emeric", "Esther", "Felix", "Flora", "Gideon", "Greta", "Hal", "Hazel", "Ines", "Isidore",
    "Jonas", "Juniper", "Kasimir", "Leona", "Linus", "Lorna", "Magnus", "Marisol", "Mateo", "Mirela", "Nadia", "Nils",
    "Odette", "Oren", "Perpetua", "Piet", "Quentin", "Rosalind", "Rufus", "Selma", "Silas", "Tamsin", "Theo",
    "Ursula", "Valentin", "Vera", "Wendel", "Wilhelmina", "Xavier", "Yara", "Yusuf", "Zelda", "Agnes", "Barnaby",
    "Constance", "Dorian", "Evander", "Fenella", "Ignatius", "Lavinia", "Mortimer", "Philippa", "Alaric", "Bettina",
    "Cormac", "Delphine", "Eamon", "Fiora", "Godfrey", "Honora", "Ivo", "Jessamy", "Kit", "Lucan", "Maude", "Niamh",
    "Osric", "Pippa", "Rowena", "Soren", "Thaddeus", "Una", "Vivian", "Winifred", "Zachary", "Aurelio", "Benedikt",
    "Carys", "Desmond", "Elodie", "Florian", "Gwendolyn", "Hamish", "Isolde", "Jasper", "Katya", "Leopold", "Minerva",
    "Nikolai", "Ottilie", "Percival", "Rosamund", "Sebastian", "Tabitha", "Ulrich", "Violetta", "Wilfred", "Ximena",
    "Yvette", "Zephyr", "Anselm", "Briony", "Caspian", "Dorothea", "Emrys", "Fintan", "Griselda", "Hector", "Imogen",
    "Jolyon", "Kerensa", "Lysander",
]
FAMILY_NAMES = [
    "Ashdown", "Blackwood", "Carrow", "Dunmore", "Everly", "Fairweather", "Greaves", "Holloway", "Ingram",
    "Kettering", "Lockhart", "Marchbanks", "Nettleford", "Oakes", "Pemberton", "Quill", "Ravensworth", "Sallow",
    "Thorne", "Underhill", "Vance", "Whitlock", "Yardley", "Abernethy", "Bramwell", "Cheverton", "Dalrymple",
    "Estcourt", "Fotheringay", "Gilchrist", "Hartigan", "Illingworth", "Jessop", "Kilbride", "Larkin", "Mortlake",
    "Nightingale", "Oxley", "Prothero", "Quennell", "Rushworth", "Standish", "Trelawney", "Upjohn", "Verity",
    "Wetherby", "Ashcombe", "Bellamy", "Crabtree", "Dimmock", "Ellwood", "Fenwick", "Gresham",
]
TITLES = [
    "the old clockmaker", "the ferryman", "the tailor's cousin", "the baker", "the lamplighter", "the young clerk",
    "the widow", "the fisherman", "the cartographer", "the innkeeper", "the apprentice", "the retired captain",
    "the weaver", "the organist", "the stationmaster", "the chandler", "the harbourmaster", "the glassblower",
    "the bell-ringer", "the midwife", "the shepherd", "the postmistress", "the locksmith", "the cooper",
    "the ropemaker", "the curate", "the night watchman", "the seamstress", "the bookbinder", "the tinker",
]
TOWNS = [
    "Harrowgate", "Millbrook", "Saltmere", "Wyncombe", "Ashford Cross", "Kestrel Bay", "Fernhollow", "Greystone",
    "Larkspur", "Otterburn", "Pennywell", "Thistledown", "Brackenridge", "Coldharbour", "Amberley", "Blackwater",
    "Cragmoor", "Dunwich Hollow", "Eastleigh Mere", "Foxcote", "Gallowmere", "Hollybush", "Ivywell", "Juniper Ford",
    "Kingsdown", "Lowmoor", "Marrowby", "Nethercombe", "Oakhampstead", "Pellingford", "Quarrendon", "Rookhaven",
    "Stonebridge", "Tarrant Magna", "Upwater", "Vellacott", "Whinfell", "Yarrowdale", "Zennor Cove",
]
SETTINGS = [
    "the harbour", "the market square", "the old mill", "the chapel", "the stone bridge", "the lighthouse",
    "the orchard", "the library", "the railway platform", "the bakery", "the inn", "the boathouse", "the riverbank",
    "the village green", "the greenhouse", "the bell tower", "the workshop", "the meadow", "the attic", "the cellar",
    "the courtyard", "the tea room", "the museum", "the quay", "the lane", "the hill above the town",
    "the churchyard", "the ferry landing", "the bookshop", "the pier", "the apothecary", "the granary",
    "the signal box", "the tannery", "the cloister", "the tollhouse", "the watermill", "the forge", "the chandlery",
    "the dovecote", "the ropewalk", "the bandstand", "the almshouse", "the saltworks", "the weir", "the cider press",
    "the clock shop", "the printing house", "the coaching inn", "the walled yard", "the old quarry", "the sea wall",
    "the cattle market", "the glasshouse", "the town hall", "the lock-keeper's cottage", "the lime kiln",
    "the village pump", "the stables", "the pottery",
]
THINGS = [
    "lantern", "letter", "violin", "compass", "teacup", "ribbon", "map", "umbrella", "pocket watch", "basket",
    "notebook", "candle", "shawl", "key", "bicycle", "kettle", "paintbrush", "telescope", "parcel", "hat",
    "photograph", "scarf", "wooden box", "fishing rod", "jar of honey", "loaf of bread", "chess set", "quilt",
    "thimble", "harmonica", "spyglass", "tinderbox", "sextant", "music box", "locket", "barometer", "ledger",
    "snuffbox", "walking stick", "birdcage", "hourglass", "inkwell", "pewter jug", "horseshoe", "spinning top",
    "weather vane", "copper pan", "embroidery hoop", "brass bell", "oil lamp", "tin soldier", "silk purse",
    "pair of spectacles", "deck of cards", "flute", "lace collar", "quill pen", "woollen mitten", "wicker chair",
    "clay pipe", "trowel", "bundle of letters", "seed packet",
]
ADJECTIVES = [
    "old", "small", "battered", "polished", "faded", "heavy", "delicate", "crooked", "bright", "dusty", "curious",
    "weathered", "tiny", "enormous", "familiar", "borrowed", "silver", "wooden", "gleaming", "chipped", "rusted",
    "elegant", "peculiar", "threadbare", "gilded", "scuffed", "lopsided", "fragrant", "sturdy", "mysterious",
    "antique", "lacquered", "moth-eaten", "sun-bleached", "cherished", "ordinary", "ornate", "tarnished", "flimsy",
    "velvet", "painted", "splintered", "humble", "magnificent", "mislaid", "well-worn", "carved", "speckled",
]
WEATHER = [
    "Rain drummed softly on the roofs of {town}.", "A thin fog had settled over {setting}.",
    "The wind came in cold from the sea.", "It was a bright and windless morning.",
    "Snow had fallen in the night and the streets were quiet.", "The afternoon was hot and heavy with bees.",
    "Clouds gathered slowly above {town}.", "A pale sun broke through the mist over {setting}.",
    "The evening light turned the water to copper.", "Thunder rolled somewhere far beyond the hills.",
    "Frost glittered on every railing.", "A warm drizzle blurred the windows of {setting}.",
    "Hail rattled against the shutters of {setting}.", "A mild breeze carried the scent of hay.",
    "The sky over {town} was the colour of slate.", "Mist rose from the fields like steam from a cup.",
    "Sleet had turned the lanes of {town} to slush.", "The first warm day of spring drew everyone outdoors.",
    "Lightning flickered silently on the horizon.", "Dew still clung to the hedgerows.",
]
TIMES = [
    "That morning", "Later that day", "In the evening", "Just before noon", "At dusk", "The next day",
    "Some weeks later", "On Sunday", "Long after midnight", "At first light", "By the afternoon",
]
ACTIONS = [
    "{name} sat by the window and read for an hour.", "{name} waited patiently near {setting}.",
    "{name} laughed at something nobody else had noticed.", "{name} wrote a long letter and never sent it.",
    "{name} mended the {adj} {thing} with great care.", "{name} hummed an old tune while working.",
    "{name} counted the coins twice and sighed.", "{name} watched the boats rocking on the tide.",
    "{name} found a {adj} {thing} under the bench.", "{name} polished the {thing} until it shone.",
    "{name} stood very still and listened.", "{name} sketched {setting} in a {adj} notebook.",
    "{name} lit a candle and opened the {adj} book.", "{name} forgot the {thing} on the windowsill.",
    "{name} asked {other} about the {adj} {thing}.", "{name} and {other} argued about the price of bread.",
    "{name} helped {other} carry a heavy crate up the stairs.", "{name} smiled at {other} across {setting}.",
    "{name} lent {other} a {adj} {thing} for the evening.", "{name} told {other} a story about {town}.",
    "{name} kept the {thing} wrapped in a {adj} cloth.", "{name} paused at {setting} to catch a breath.",
    "{name} whistled for the dog and waited.", "{name} swept the floor of {setting}.",
    "{name} traded a {adj} {thing} for a basket of plums.", "{name} fed the hens and scattered the grain.",
    "{name} sharpened a pencil and began a list.", "{name} read the notice pinned outside {setting}.",
    "{name} played a slow tune on the {thing}.", "{name} peeled potatoes and said nothing at all.",
    "{name} wound the clock and set it right.", "{name} fastened the shutters against the wind.",
    "{name} bargained with {other} over a {adj} {thing}.", "{name} showed {other} the way to {setting}.",
    "{name} thanked {other} for the {adj} {thing}.", "{name} and {other} shared a pot of tea.",
]
THOUGHTS = [
    "{name} wondered whether the letter would ever arrive.", "{name} remembered summers spent in {town}.",
    "{name} could not decide what to say.", "It seemed to {name} that the day would never end.",
    "{name} felt, for the first time in years, entirely at ease.", "A strange thought occurred to {name}.",
    "{name} was certain that something had changed.", "{name} hoped that {other} would understand.",
    "Nobody had ever explained the matter to {name}.", "{name} thought of the {adj} {thing} and smiled.",
    "{name} suspected that {other} knew more than {pronoun} admitted.",
    "{name} resolved to speak plainly the next day.", "The thought of {town} made {name} homesick.",
    "{name} could almost hear the sea from {setting}.", "{name} longed for a quiet evening.",
]
SAYINGS = [
    "I have never seen the tide so high", "You should have told me sooner", "It will rain before supper",
    "There is always another way", "Nobody in {town} remembers that winter", "Do you hear the bells",
    "We ought to wait a little longer", "That is the oddest thing I have heard all week",
    "The {thing} belonged to my grandmother", "I think we are being watched", "Let us not quarrel today",
    "Everything costs twice as much as it used to", "The road will be muddy after this weather",
    "I only wanted to help", "Come and look at this", "Perhaps tomorrow will be kinder",
    "Fetch the lantern before it gets dark", "My aunt swore by camomile tea", "The ferry is late again",
    "I would not trust that ladder", "You look as though you have seen a ghost", "Keep the {thing} somewhere safe",
    "The harvest will be poor this year", "I never did learn to swim", "Half of {town} will be at the fair",
    "Mind the step, it is loose", "Do you remember the flood", "Do you know where the key is kept",
    "It is colder than it was yesterday", "Write to me when you arrive",
]
SPEECH_VERBS = [
    "said", "replied", "whispered", "muttered", "called", "admitted", "insisted", "declared",
]
QUESTION_VERBS = [
    "asked", "wondered aloud", "inquired",
]
DESCRIPTIONS = [
    "The {adj} door creaked on its hinges.", "Gulls wheeled and cried above {setting}.",
    "Somewhere a dog barked twice and fell silent.", "The smell of fresh bread drifted along the lane.",
    "A cart rattled over the cobbles.", "The clock in the tower struck the hour.",
    "Children were singing somewhere out of sight.", "The river ran fast and brown after the rain.",
    "Smoke rose straight up from the chimneys of {town}.", "The shelves were crowded with {adj} jars.",
    "Ivy had crept over the walls of {setting}.", "The lamps of {town} came on one by one.",
    "Pigeons strutted along the gutters of {setting}.", "A kettle whistled in a back room.",
    "The floorboards creaked with every step.", "Lamplight pooled on the wet cobbles of {town}.",
    "Someone was practising scales on an out-of-tune piano.", "The market stalls were heaped with {adj} wares.",
    "A ship's horn sounded far out in the bay.", "Cats dozed in every patch of sunlight.",
]


TAILS = [
    "without a word", "as the bells rang", "before anyone else was awake", "for the third time that week",
    "while the kettle boiled", "with a puzzled frown", "long after the others had gone home",
    "as if nothing had happened", "in the grey light", "to nobody's surprise", "once the rain had stopped",
    "humming under {pronoun} breath", "with more patience than usual", "as the clock struck four",
    "until the candles burned low", "in spite of the cold", "while the gulls quarrelled overhead",
    "with a sigh of relief", "just as the shutters were closing", "before supper", "after a long silence",
    "as the tide turned", "in the usual careful way", "with trembling hands", "for reasons nobody explained",
]
PLACES_ON = [
    "on the table", "beside the door", "under a pile of papers", "on the highest shelf", "by the fireplace",
    "in a drawer", "on the windowsill", "behind the curtain", "near the stove", "at the bottom of a trunk",
]
STILL_LIFE = [
    "The {adj} {thing} lay {place_on}.", "Someone had left a {adj} {thing} {place_on}.",
    "A {adj} {thing} waited {place_on}, forgotten.", "Nobody touched the {thing} {place_on}.",
]
LEADS = [
    "Outside", "Somewhere nearby", "Across {town}", "Above {setting}", "For a while", "Meanwhile",
    "Not far from {setting}", "All at once", "Later", "Beyond the rooftops", "Once again", "Just then",
]
CONNECTIVES = [
    ", and then ", ", while ", ", although ", "; meanwhile ", ", because ", ", so ",
]


_COMMON_STARTS = {"The", "A", "It", "Nobody", "Someone", "Somewhere", "Children", "Gulls", "Smoke", "Snow",
                  "Rain", "Thunder", "Clouds", "Frost", "Ivy"}


def _continue(text: str) -> str:
    """`text` as the continuation of a sentence: lower-case its first word unless it is a name."""
    first = text.split(" ", 1)[0]
    return text[0].lower() + text[1:] if first in _COMMON_STARTS else text


def _fill(template: str, rng: random.Random, cast: list[str], setting: str, town: str) -> str:
    name = rng.choice(cast)
    others = [c for c in cast if c != name] or [rng.choice(TITLES)]
    return template.format(name=name, other=rng.choice(others), setting=setting, town=town,
                           thing=rng.choice(THINGS), adj=rng.choice(ADJECTIVES), place_on=rng.choice(PLACES_ON),
                           pronoun=rng.choice(["her", "his", "their"]))


def _character(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.55:
        return rng.choice(FIRST_NAMES)
    if roll < 0.8:
        return f"{rng.choice(['Mr', 'Mrs', 'Miss', 'Dr'])} {rng.choice(FAMILY_NAMES)}"
    return rng.choice(TITLES)  # "the baker": capitalised only where it starts a sentence


def _sentence(rng: random.Random, cast: list[str], setting: str, town: str) -> str:
    kind = rng.choices(["action", "thought", "dialogue", "description", "weather", "still", "compound"],
                       [5, 2, 3, 2, 1, 1, 2])[0]
    if kind == "dialogue":
        speaker = rng.choice(cast)
        saying = _fill(rng.choice(SAYINGS), rng, cast, setting, town)
        if saying.startswith("Do you"):
            return f"\u201c{saying}?\u201d {rng.choice(QUESTION_VERBS)} {speaker}."
        return f"\u201c{saying},\u201d {rng.choice(SPEECH_VERBS)} {speaker}."
    if kind == "compound":  # two clauses: "X did this, while Y did that."
        first = _fill(rng.choice(ACTIONS), rng, cast, setting, town).rstrip(".")
        second = _fill(rng.choice(ACTIONS + THOUGHTS), rng, cast, setting, town)
        text = first + rng.choice(CONNECTIVES) + _continue(second)
    else:
        pool = {"action": ACTIONS, "thought": THOUGHTS, "description": DESCRIPTIONS, "weather": WEATHER,
                "still": STILL_LIFE}[kind]
        text = _fill(rng.choice(pool), rng, cast, setting, town)
        if kind in ("description", "weather", "still") and rng.random() < 0.6:
            lead = _fill(rng.choice(LEADS), rng, cast, setting, town)
            text = f"{lead}, {_continue(text)}"
        if kind == "action" and rng.random() < 0.5:
            text = text.rstrip(".") + " " + _fill(rng.choice(TAILS), rng, cast, setting, town) + "."
    return text[0].upper() + text[1:]


def _scene(rng: random.Random) -> str:
    town, setting = rng.choice(TOWNS), rng.choice(SETTINGS)
    cast = list(dict.fromkeys(_character(rng) for _ in range(rng.randint(1, 3))))
    opening = rng.choice([f"{rng.choice(TIMES)}, {cast[0]} arrived at {setting}.",
                          _fill(rng.choice(WEATHER), rng, cast, setting, town),
                          f"{rng.choice(TIMES)} the streets of {town} were busy."])
    sentences = [opening] + [_sentence(rng, cast, setting, town) for _ in range(rng.randint(3, 9))]
    return " ".join(sentences)


def filler_document(side: str, seed: int, index: int) -> str:
    """Document `index` of the (side, seed) stream: 1-5 paragraphs separated by blank lines."""
    rng = random.Random(f"lm2-filler/{side}/{seed}/{index}")
    return "\n\n".join(_scene(rng) for _ in range(rng.randint(1, 5)))
