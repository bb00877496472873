"""Deterministic generator for the bundled demo dataset (``python -m steer.demo_data.build``).

Every example is a player talking to a fantasy-game NPC. The NPC's reply is assembled from
three independent slots of a hand-written fragment library, and each slot alone decides one
attribute, so the labels follow from the fragments chosen:

    reply = [creativity sentence] + [helpfulness core] + [humor line]

* helpfulness (0-4): the core. 0 = dismissive or irrelevant (per NPC and generic lines),
  1 = vague non-answer (per NPC), 2 = on topic but partial, 3 = useful, 4 = concrete and
  specific (prices, times, places, steps). Cores 2-4 are written per request ("intent": one
  player question in 3-5 wordings), so a level-4 core really answers the question asked.
  Cores are written plainly and without jokes, so they carry no humor or creativity.
* creativity (0-4): an optional leading sentence about the NPC's surroundings. 0 = none,
  1 = plain short description, 2 = a simile, 3 = a vivid metaphor, 4 = a striking metaphor
  plus a strange, specific detail. Written straight, never as a joke.
* humor (0-4): an optional closing line. 0 = none, 1 = a dry, barely-there aside,
  2 = a light quip, 3 = a pun or clear joke with one exclamation, 4 = over-the-top comic
  exaggeration opening with a laugh ("Ha!") and several exclamations. Humor lines add no
  information.

The three levels of each row are drawn from independently shuffled, balanced lists, so the
marginals are (almost exactly) uniform and the attributes are close to uncorrelated.
Only the standard library is used, and all randomness comes from seeded ``random.Random``
instances, so the output is byte-identical on every run.

Usage::

    python -m steer.demo_data.build            # (re)write the files next to this module
    python -m steer.demo_data.build --out DIR  # write them elsewhere
    python -m steer.demo_data.build --stats    # also print histograms and correlations
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ATTRIBUTES = ("helpfulness", "humor", "creativity")
SOURCE = "steer-demo"
RATED_SEED = 20240501
UNRATED_SEED = 20240502
# Row counts are capped by file size: each JSONL file must stay well under 1 MB.
N_RATED = 1700
N_UNRATED = 1900
PERSONA_PROB = 0.8  # share of rows that carry the NPC persona as a system line
GREETING_PROB = 0.3  # share of player lines that open with a greeting

# --------------------------------------------------------------------------- fragment library
# NPCS, per NPC: personas, vague cores (helpfulness 1), dismissive cores (helpfulness 0), humor
# lines (levels 1-4) and creativity sentences (levels 1-4). TOPICS, per NPC and topic: the player
# requests and the cores that answer them (helpfulness 2-4).

NPCS: dict[str, dict] = {
    "blacksmith": {
        "personas": [
            "You are Brom, the village blacksmith.",
            "You are Hilda Ironhand, the blacksmith of Ashford.",
        ],
        "vague": [
            "Hm. Maybe. It depends on a lot of things, really.",
            "Could be done, could not. Hard to say much without a closer look.",
            "There are ways, I suppose. I would not want to promise anything.",
        ],
        "dismiss": [
            "Not now. The forge needs tending and I have no time for questions.",
            "Go and bother someone else. I have horseshoes to finish before dark.",
            "I only talk when the fire is out, and the fire is never out.",
        ],
        "humor": {
            1: [
                "Mind the sparks, they bite.",
                "Not that my apprentice ever listens to me.",
                "The hammer and I have an understanding, mostly.",
            ],
            2: [
                "My apprentice tried doing that himself once, and now he bakes bread for a living.",
                "I would charge extra for all the sighing, but that part is free.",
                "If you hear swearing from the back, that is just the anvil and me discussing things.",
            ],
            3: [
                "I had a joke about my anvil, but it was too heavy to lift the mood!",
                "Working iron all day makes life very iron-ic, you know!",
                "Trust me, I never strike a bad deal, only good iron!",
            ],
            4: [
                "Ha! My hammering sounds so much like thunder the village brings in the washing! Twice a day!",
                "Ha ha! My anvil remembers when dragons were small lizards! With big plans!",
                "Ho ho! I sneezed by the bellows and the fire fled to the next village! Still there!",
            ],
        },
        "creative": {
            1: [
                "The forge is hot this morning.",
                "The anvil rings clear today.",
                "The coals are bright and ready.",
            ],
            2: [
                "The coals glow like a cat's eyes in the dark.",
                "Sparks jump from the anvil like startled birds.",
                "The bellows breathe like an old dog asleep by the door.",
            ],
            3: [
                "My forge is a sleeping dragon, and each dawn I wake it with the bellows.",
                "Steel is a stubborn river; it only bends when it is red with anger.",
                "This anvil is a drum, and the whole street marches to its beat.",
            ],
            4: [
                "The anvil is a fallen black moon; every seventh strike it hums one low note at dusk.",
                "My hammer is older than the well; on cold mornings it smells of oranges, though none grow here.",
                "This fire has burned forty-one years; some nights its smoke curls into a perfect key.",
            ],
        },
    },
    "innkeeper": {
        "personas": [
            "You are Mara, the innkeeper of the Crooked Stag.",
            "You are Old Tobin, who runs the Crooked Stag inn.",
        ],
        "vague": [
            "Maybe, maybe not. Ask me again later when it is quieter.",
            "Oh, I might know something about that. Hard to say.",
            "We will see what we can do. No promises tonight.",
        ],
        "dismiss": [
            "Can you not see the hall is full? Wait your turn or go elsewhere.",
            "I am not here to chat. Buy a drink or make room at the bar.",
            "Not my business, dear. I just pour the ale and sweep the floor.",
        ],
        "humor": {
            1: [
                "The ale is honest, at least.",
                "Do not mind the singing; it gets worse before it gets better.",
                "The cat runs the place, really. I just keep the books.",
            ],
            2: [
                "Our last guest liked the beds so much he slept through two days and a wedding.",
                "The stew is famous. Nobody knows for what, but it is famous.",
                "The bard in the corner takes requests, mostly requests to stop.",
            ],
            3: [
                "Our bread is so good we knead it twice. No loafing around here!",
                "The ale here is brewed with pride and a little hops. Mostly hops!",
                "Our best room has a stable view. Very stable. Neigh-bors included!",
            ],
            4: [
                "Ha! Last winter the stew was so thick a guard used it as a shield! He won!",
                "Ha ha! Our beds are so soft a knight sank in at spring! We found him at harvest!",
                "Ho ho! Our cook baked a pie so big it needed its own room! It paid rent!",
            ],
        },
        "creative": {
            1: [
                "The hall is warm tonight.",
                "The fire is lit and the tables are clean.",
                "It is a busy evening here.",
            ],
            2: [
                "The common hall hums like a beehive full of gossip.",
                "The fire crackles like an old man telling stories.",
                "Candles flicker on the tables like sleepy fireflies.",
            ],
            3: [
                "This inn is a ship of warm light anchored in a cold sea of night.",
                "Every mug in this hall is a small lantern of stories, filled and emptied again.",
                "The stairs are a long creaking poem, and every guest adds a line.",
            ],
            4: [
                "The inn is a lantern in the night's mouth; the third stair groans only for liars.",
                "The hearth is a sleeping orange fox; on the longest night its smoke smells of sea salt.",
                "Every stool is a throne for tired kings; one bears a carved name nobody here can read.",
            ],
        },
    },
    "guard": {
        "personas": [
            "You are Captain Reyes of the town guard.",
            "You are Sergeant Dunn, keeper of the north gate.",
        ],
        "vague": [
            "Could be. We have a lot going on. Ask again later.",
            "There are rules about that somewhere. I would have to check.",
            "Maybe. I just stand here and watch the road, mostly.",
        ],
        "dismiss": [
            "Move along, traveler. You are blocking the gate and there is a line behind you.",
            "I am on duty and have no time for your questions. Step aside.",
            "Not my problem. Talk to someone who is paid to care about it.",
        ],
        "humor": {
            1: [
                "My helmet is too tight for thinking, anyway.",
                "The gate has seen a lot of faces. Few of them were happy.",
                "I would salute, but my arm is tired.",
            ],
            2: [
                "The last fellow who argued with me is still explaining himself to the gate.",
                "A thief last week tried to hide in a barrel of pickles. He came out sour.",
                "My sergeant says I have a face for guard duty. I think it was an insult.",
            ],
            3: [
                "Guard duty is not hard, it is just a long watch. Very long. Ask my watch!",
                "Do not worry, the thieves are under arrest. Well, under a rest, at least!",
                "I guard the gate so well that I have become a real gate-keeper of jokes!",
            ],
            4: [
                "Ha! I stared down a troll so hard it paid the toll twice! With interest!",
                "Ha ha! The last bandit here ran so fast he arrived yesterday! We are still waiting!",
                "Ho ho! My armor is so shiny the sun asks me for directions! Every morning!",
            ],
        },
        "creative": {
            1: [
                "The road is quiet this morning.",
                "The walls are tall and the watch is set.",
                "It is a cold day on the gate.",
            ],
            2: [
                "The gate creaks like an old man getting out of bed.",
                "Torches line the wall like a row of orange teeth.",
                "The road stretches out like a grey ribbon in the rain.",
            ],
            3: [
                "The walls are the town's old shoulders; I am the tired eyes on top.",
                "The night watch is a black river; we guards are small boats on it.",
                "The gate is a stone mouth, swallowing travelers at dawn, spitting them out at dusk.",
            ],
            4: [
                "The wall is a sleeping stone serpent; one brick, the ninety-ninth from the gate, stays warm all winter.",
                "The tower is a lighthouse for lost sheep; each full moon a white crow perches there, counting us.",
                "The gate key is a sleeping iron finger; at four bells it turns itself, exactly a quarter turn.",
            ],
        },
    },
    "merchant": {
        "personas": [
            "You are Pell, a traveling merchant.",
            "You are Madam Sabine, who sells goods in the market square.",
        ],
        "vague": [
            "That depends on the season, friend. Everything depends on the season.",
            "I may have something. I may not. Hard to say.",
            "Perhaps. Come back another day and we will see.",
        ],
        "dismiss": [
            "No coin, no talk. I have customers with full purses waiting.",
            "I am packing up the stall. Whatever it is, it can wait.",
            "Do I look like a guide? I sell things. Buy something or move along.",
        ],
        "humor": {
            1: [
                "Everything is on sale, including my patience.",
                "I would sell you advice too, but it is out of stock.",
                "My scales are honest, mostly.",
            ],
            2: [
                "My last customer haggled so long the goat he wanted grew old and retired.",
                "I once sold a map to a man who already lived there. He loved it.",
                "Some call it cheating. I call it creative pricing.",
            ],
            3: [
                "I sell maps too, but business has been flat lately!",
                "I used to sell calendars, but their days were numbered!",
                "These candles are a bargain, and I am not making light of it!",
            ],
            4: [
                "Ha! I sold sand to a desert king and he ordered three more bags! For his sandcastle!",
                "Ha ha! My prices are so low the gnomes think I fell down a well! Twice!",
                "Ho ho! I haggled with a dragon and walked off with its lunch money! And a receipt!",
            ],
        },
        "creative": {
            1: [
                "The stall is full today.",
                "The market is busy this morning.",
                "The goods are fresh off the cart.",
            ],
            2: [
                "My stall is stacked like a small mountain of treasure.",
                "The spices here smell like a summer storm in a far land.",
                "The cloth shines like water in the morning light.",
            ],
            3: [
                "My cart is a wandering library, each crate a chapter of some far road.",
                "Coins are little moons; they wax in my purse and wane in yours.",
                "This market is a great hungry sea, and we merchants fish it every morning.",
            ],
            4: [
                "My cart is a turtle carrying a city; one crate, locked eleven years, still ticks at night.",
                "These spices are bottled sunsets; the blue jar cost me one song and a single left boot.",
                "The market is a loud glass garden; each spring a silent stranger buys one copper spoon, paying gold.",
            ],
        },
    },
    "herbalist": {
        "personas": [
            "You are Wren, the village herbalist.",
            "You are Mother Elda, the healer of Ashford.",
        ],
        "vague": [
            "Hmm, it might help. Herbs are not always simple, you see.",
            "There could be something for that. I would need to think.",
            "Perhaps. Each body is different, so who can say.",
        ],
        "dismiss": [
            "I have a sick child in the back. Your questions will have to wait.",
            "Not now. The kettle is boiling and the roots will burn.",
            "I do not have time for this. Come back when you are truly ill.",
        ],
        "humor": {
            1: [
                "The goat ate half my garden again, so stock is low.",
                "Most of my patients live, which is nice.",
                "Tea fixes most things, or at least makes you wait politely.",
            ],
            2: [
                "My last patient said the medicine tasted awful. That is how you know it works.",
                "The village says I talk to my plants. I only do it when they talk first.",
                "I made a sleeping draught once so strong the cat still has not forgiven me.",
            ],
            3: [
                "Herbalists never get lost; we always know the root!",
                "I tried to grow a joke garden, but only the thyme came up!",
                "My remedies are good, but my mint is in mint condition!",
            ],
            4: [
                "Ha! I brewed a tonic so strong the patient danced a jig and married the mayor! Twice!",
                "Ha ha! My garlic salve is so strong the vampires moved away! They wrote to complain!",
                "Ho ho! One cup of my mint tea and a grumpy troll joined the choir! Badly! Loudly!",
            ],
        },
        "creative": {
            1: [
                "The herbs are drying by the window.",
                "The garden is green this week.",
                "The shop smells of mint today.",
            ],
            2: [
                "The dried herbs hang from the beams like sleeping bats.",
                "My kettle whistles like a little bird calling for rain.",
                "The garden smells like morning after a long storm.",
            ],
            3: [
                "My garden is a green library, and every leaf is a page about healing.",
                "Pain is a knot in the body, and herbs are patient fingers that loosen it.",
                "The forest is an old grandmother, and I only borrow from her apron pockets.",
            ],
            4: [
                "My shelves are a choir of bottles; the blue one hums before rain, and has since Tuesday.",
                "The garden is a sleeping green cat; the moonpetal opens only when someone nearby tells the truth.",
                "Roots are the forest's old letters; one shaped like a small hand has pointed north for nine years.",
            ],
        },
    },
    "sage": {
        "personas": [
            "You are Master Quill, keeper of the tower library.",
            "You are Sela, the archivist of the old library.",
        ],
        "vague": [
            "Knowledge is a wide field. Where to begin, where to begin.",
            "There may be something written about that. Or there may not.",
            "Hmm, an interesting question. I would have to look into it someday.",
        ],
        "dismiss": [
            "Silence in the library, please. Ask your questions somewhere else.",
            "I am in the middle of a very long chapter. Go away.",
            "That is not my field. I only study the old moon calendars.",
        ],
        "humor": {
            1: [
                "Do not lick your fingers when turning the pages, please.",
                "The books are older than me. Only slightly.",
                "Most of our readers are spiders, but they are very quiet.",
            ],
            2: [
                "The last apprentice who read that book aloud had blue eyebrows for a month.",
                "I have read every book here twice, except the cookbook. I do not trust it.",
                "Our oldest book is so dull it once put a dragon to sleep.",
            ],
            3: [
                "I am reading a book about floating stones. I cannot put it down!",
                "The history shelf is full of old dates, and none of them wrote back!",
                "The library is the tallest building in town, because it has the most stories!",
            ],
            4: [
                "Ha! I sneezed in the archive and the dust formed a kingdom! It crowned a moth!",
                "Ha ha! Our overdue fines are so old a great-grandson still pays them! In chickens!",
                "Ho ho! I read so fast the books read me back! One says I am dull!",
            ],
        },
        "creative": {
            1: [
                "The library is quiet this morning.",
                "The shelves are tall and very full.",
                "The candles are lit in the reading room.",
            ],
            2: [
                "The old pages whisper like dry leaves in autumn.",
                "Dust floats in the sunbeams like tiny golden fish.",
                "The shelves lean together like old friends sharing a secret.",
            ],
            3: [
                "This library is a sleeping giant, and each book is one of its dreams.",
                "Ink is frozen thought, and this tower is a winter full of it.",
                "Every map here is a door, and I am only the tired doorkeeper.",
            ],
            4: [
                "This tower is a lighthouse for lost ideas; one book up there is always warm to the touch.",
                "The archive is a well of frozen voices; at the owl hour its cards sort themselves by ink color.",
                "Books here are sleeping birds; one grey volume grows exactly one new page every winter.",
            ],
        },
    },
    "stablemaster": {
        "personas": [
            "You are Garrick, the stable master.",
            "You are Nell, who runs the stables by the west gate.",
        ],
        "vague": [
            "Horses are horses. Some days are good, some days are not.",
            "That could work. Or it could not. Hard to tell with animals.",
            "Maybe. I would need to see the horse first, one of these days.",
        ],
        "dismiss": [
            "Mind the muck and get out of the way. I have stalls to clean.",
            "I am busy with a new foal. Whatever it is, it can wait.",
            "Ask the horses. They know more than I do and they talk less.",
        ],
        "humor": {
            1: [
                "The horses here judge everyone, quietly.",
                "Watch your boots; the floor is not all mud.",
                "The goat thinks it is a horse. We let it believe.",
            ],
            2: [
                "My best mare will not leave the stable until I sing to her. I sing badly.",
                "The old gelding is smarter than most of my customers, and he knows it.",
                "One horse here bites only people wearing hats. We never found out why.",
            ],
            3: [
                "Why the long face? Oh, wait, that is just the horse!",
                "My horses are stable, and so is my business!",
                "That mare is a real night-mare at bedtime!",
            ],
            4: [
                "Ha! I rode so fast once that we beat our own shadow home! It sulked for days!",
                "Ha ha! This colt ate so many apples he grew leaves! We had to prune him!",
                "Ho ho! My stallion snores so loud the village hides under tables! Every night!",
            ],
        },
        "creative": {
            1: [
                "The stable is clean today.",
                "The horses are calm this morning.",
                "There is fresh hay in the loft.",
            ],
            2: [
                "The horses' breath rises like steam from a kettle.",
                "The hay smells like the end of a long summer.",
                "Hoofbeats echo like soft drums in the yard.",
            ],
            3: [
                "A horse is a river with legs; you learn its currents, not rule them.",
                "This stable is a warm church of breath and straw.",
                "Every saddle here is a story waiting for a road.",
            ],
            4: [
                "The paddock is a brown sea at dawn; the white mare faces east whenever strangers come.",
                "The stable is a wooden heart beating with hooves; one loft beam bears ninety tally marks nobody carved.",
                "Horses here are dreams with manes; the oldest has drunk only from the blue bucket for twelve years.",
            ],
        },
    },
    "ferryman": {
        "personas": [
            "You are Osk, the ferryman of the Greywater river.",
            "You are Old Bertil, who poles the ferry across the river.",
        ],
        "vague": [
            "The river knows. I just push the boat.",
            "That depends on the water, and the water changes its mind.",
            "Could be, could be. Ask me when the fog lifts.",
        ],
        "dismiss": [
            "Pay or step off the dock. I do not ferry questions.",
            "Not now. The tide is turning and I need both hands.",
            "I do not talk while I work, and I am always working.",
        ],
        "humor": {
            1: [
                "The boat leaks a little, but only on purpose.",
                "I have never lost a passenger. Misplaced one, maybe.",
                "The fish here are the only ones who tip.",
            ],
            2: [
                "My last passenger was so scared he poled the whole way himself. I let him.",
                "The boat is older than me, but it complains less.",
                "Someone asked if the ferry was safe. I said it has not sunk yet today.",
            ],
            3: [
                "Ferry work has its ups and downs, and plenty of ferry tales!",
                "Business on the river keeps flowing, even if my jokes are shallow!",
                "I never lose my way on the water. I am very oar-ganized!",
            ],
            4: [
                "Ha! I once poled so hard I crossed the river, the sea and half of tomorrow! Twice!",
                "Ha ha! A fish jumped aboard and paid the fare! Two copper! Exact change!",
                "Ho ho! The fog got so thick I sold it in jars! The whole village bought some!",
            ],
        },
        "creative": {
            1: [
                "The river is calm today.",
                "The water is low this morning.",
                "There is fog on the water.",
            ],
            2: [
                "The fog lies on the water like a white wool blanket.",
                "The river moves like a grey snake through the reeds.",
                "The oars creak like old doors in the wind.",
            ],
            3: [
                "The river is a silver thread; my ferry is the needle that stitches the shores.",
                "Fog is the river's old beard, and the sun shaves it every noon.",
                "The current is a patient hand that pulls at every boat.",
            ],
            4: [
                "The river is the moon's silver road; each spring one green lantern floats down from nowhere, still lit.",
                "The water is a mirror of old voices; every ninth crossing my pole strikes a sunken stone bell.",
                "My ferry is a tortoise dreaming of the sea; its bell rang alone the dawn the king died.",
            ],
        },
    },
}

# Per NPC and topic: a shared partial answer (helpfulness 2) and a list of intents. Each intent
# is one player request in several wordings, with cores written to answer exactly that request
# (helpfulness 3 and 4, and 2 where the topic-level partial answer would not fit).
TOPICS: dict[str, dict[str, dict]] = {
    "blacksmith": {
        "repair": {
            2: [
                "I can work on it, but it will take a while. Leave it on the bench and come back later.",
                "That can be fixed. The price depends on how bad the damage is once I clean it up.",
            ],
            "intents": [
                {
                    "users": [
                        "Can you fix my sword? The blade is chipped.",
                        "My axe has gone dull. Can you sharpen it?",
                        "How much to put a new edge on my old sword?",
                        "Could you repair this rusty hunting knife?",
                    ],
                    3: ["Leave it with me. I will grind out the damage and put a fresh edge on it by tomorrow."],
                    4: [
                        "Leave it on the bench. I will grind out the damage, re-temper the steel and oil it. Five silver, ready by sunset tomorrow.",
                        "Three silver, paid now. I will heat it, hammer it true and hone a new edge. Collect it tomorrow at noon, with the sheath.",
                    ],
                },
                {
                    "users": [
                        "My dagger is bent. Is it worth fixing?",
                        "The tip of my spear snapped off. Can you mend it?",
                        "My sword is cracked near the hilt. Can it be saved?",
                    ],
                    3: ["It can be saved. I will heat it, reforge the damaged part and sharpen it again for a few silver."],
                    4: [
                        "Worth saving, yes. An hour in the fire to reforge it, one in the quench. Four silver; wait by the well and I will ring when done.",
                        "Yes. I will cut back the damage, forge a new section and weld it in. Six silver, ready in two days. Do not use it until then.",
                    ],
                },
            ],
        },
        "armor": {
            2: [
                "I have a few pieces on the rack, some leather and some mail. Have a look and see what fits.",
                "Leather is cheap and mail is strong. Which one you want is up to your purse.",
            ],
            "intents": [
                {
                    "users": [
                        "I need armor for the road. What do you have?",
                        "What armor would protect me from wolves?",
                        "What should a new adventurer wear for protection?",
                        "Is leather armor good enough for travel?",
                    ],
                    3: [
                        "For the road, pick boiled leather over a mail shirt. It is light to walk in and stops most bites.",
                        "Get a padded jacket and a simple mail shirt. That stops wolves and bandit knives without slowing you down.",
                    ],
                    4: [
                        "Take the mail shirt on the left rack, twelve silver, and a leather jerkin for four. Together they stop teeth and arrows.",
                        "Leather alone is too thin. Wear boiled leather over a mail shirt: eighteen silver for both, and I fit the straps for free.",
                    ],
                },
                {
                    "users": [
                        "I have little coin. Is there any cheap armor for sale?",
                        "What is the cheapest armor you have?",
                        "I cannot afford much. What armor can I get?",
                    ],
                    3: ["Boiled leather is the cheapest armor that still works. A vest and a cap will not cost you much."],
                    4: ["With little coin, buy the boiled leather vest for six silver and a steel cap for two. Guard chest and head first."],
                },
                {
                    "users": [
                        "Do you sell chain mail?",
                        "How much is a mail shirt?",
                        "Can I try on your chain mail?",
                    ],
                    3: ["Yes, I have mail shirts on the rack by the door. They are not cheap, but they last for years."],
                    4: [
                        "Yes. A mail shirt is fifteen silver, with a padded jacket underneath for three. Try one on by the door; I adjust the straps for free.",
                    ],
                },
            ],
        },
        "mine": {
            2: [
                "There is a mine up in the hills somewhere. I have not been there in years.",
                "The ore comes from the east, from a mine in the hills. The road is rough, that much I know.",
            ],
            "intents": [
                {
                    "users": [
                        "Where does your iron come from?",
                        "Is there a mine near here?",
                        "I am looking for good ore. Where should I go?",
                        "Who supplies your iron and coal?",
                    ],
                    3: ["My ore comes from the Redrock mine in the eastern hills. Follow the mine road and watch out for loose rocks."],
                    4: ["Redrock mine, half a day east: past the burned mill, left at the fork. Tam the foreman sells ore at two silver a sack."],
                },
                {
                    "users": [
                        "Is the road to the mine safe?",
                        "Have you heard anything about the old mine?",
                        "Is it dangerous up at the mine?",
                    ],
                    3: ["The road to the Redrock mine is safe in daylight, but wolves roam it after dark. Stay out of the old shafts."],
                    4: [
                        "The Redrock mine, half a day east. The road is safe to the old bridge; past it, travel by daylight on the left bank.",
                        "The old north shaft at Redrock flooded last spring and is closed. The new shaft is safe; Tam the foreman keeps the keys.",
                    ],
                },
            ],
        },
    },
    "innkeeper": {
        "room": {
            2: [
                "There might be a room free upstairs. I would have to check the book.",
                "We have rooms, but they fill up fast. The price depends on which one.",
            ],
            "intents": [
                {
                    "users": [
                        "Do you have a room for the night?",
                        "How much for a bed?",
                        "I need somewhere to sleep. Any rooms free?",
                        "Can I stay here for three nights?",
                    ],
                    3: ["Yes, there is a room upstairs with a clean bed. It is two silver a night, and breakfast comes with it."],
                    4: ["Room four, top of the stairs, is free. Two silver a night, three nights for five. Breakfast at dawn; the door locks at midnight."],
                },
                {
                    "users": [
                        "Is there a quiet room away from the common hall?",
                        "My friend and I need a room. Do you have space?",
                        "Do you have a room with two beds?",
                    ],
                    3: ["The back room is quiet and has two beds. Pay now and the key is yours."],
                    4: ["The back room is quietest, away from the hall. Three silver a night, two beds, hot water on request. Pay now for the key."],
                },
            ],
        },
        "food": {
            2: [
                "There is food in the kitchen. Stew, mostly. Ask the cook.",
                "We have a few things tonight. Bread, stew, something with cheese. Depends what is left.",
            ],
            "intents": [
                {
                    "users": [
                        "What is good to eat tonight?",
                        "I am starving. What do you have?",
                        "Do you serve anything without meat?",
                        "What is in the stew today?",
                        "Is the kitchen still open?",
                    ],
                    3: ["The mutton stew is good tonight, and there is fresh bread. If you want no meat, ask for the barley soup."],
                    4: [
                        "Mutton stew with carrots tonight, one silver a bowl, or barley and mushroom soup if you eat no meat. The kitchen closes at the tenth bell.",
                        "Kitchen closes at the tenth bell. Stew and bread, one silver; cider, two copper. The barley soup has no meat in it.",
                    ],
                },
                {
                    "users": [
                        "Can I get food for the road?",
                        "Could you pack me some food for a journey?",
                        "I leave at dawn. Can I buy provisions?",
                    ],
                    3: ["I can wrap bread and cheese for the road. Tell me tonight and it will be ready in the morning."],
                    4: ["For the road I pack bread, hard cheese and apples, three copper a day. Order by the tenth bell and it waits at the bar at dawn."],
                },
            ],
        },
        "rumors": {
            2: [
                "People talk about all sorts. Something about trouble out east, I think.",
                "There is always someone needing help. Check the notice board, maybe.",
            ],
            "intents": [
                {
                    "users": [
                        "Who around here might have work for me?",
                        "Anyone looking to hire a sword arm?",
                        "Is there any paid work in town?",
                    ],
                    3: ["The miller says wolves have been taking her sheep. She would pay someone to deal with them."],
                    4: ["Jessa the miller lost six sheep to wolves this month and pays ten silver for the pack leader. Her mill is past the east bridge."],
                },
                {
                    "users": [
                        "Heard any interesting rumors lately?",
                        "Is anything strange going on in town?",
                        "What do people talk about in here?",
                        "Where can I find adventure around here?",
                    ],
                    3: ["Farmers say lights have been seen in the old watchtower at night. The mayor wants someone to look into it."],
                    4: ["Lights in the old watchtower, three nights running. The mayor pays twenty silver to learn why; see him at the town hall before noon."],
                },
            ],
        },
    },
    "guard": {
        "gate": {
            2: [
                "There are rules for the gate. You will have to follow them like everyone else.",
                "The gate opens and closes at set times. There may be a toll, depending on your cargo.",
            ],
            "intents": [
                {
                    "users": [
                        "Can I pass through the gate?",
                        "What do I need to enter the city?",
                        "Is there a toll to get into town?",
                        "Can I bring my weapons into the city?",
                    ],
                    3: [
                        "You can pass if you pay the toll and keep your blade sheathed. The gate closes at sundown and opens at dawn.",
                        "State your business and pay the toll. Weapons stay sheathed and peace-bound inside the walls.",
                    ],
                    4: ["Toll is two copper on foot, five with a cart. The gate opens at dawn, shuts at sundown, and blades stay peace-bound inside."],
                },
                {
                    "users": [
                        "Why is the gate closed?",
                        "When does the gate open in the morning?",
                        "Will the gate open again tonight?",
                    ],
                    3: ["It is closed for the night because of bandits on the roads. It opens again at first light."],
                    4: ["It is shut until dawn because of bandits on the south road. It opens at the first bell; come early, the line gets long."],
                },
            ],
        },
        "crime": {
            2: [
                "Thefts happen. Tell someone at the guardhouse and they will write it down.",
                "We will look into it when we can. There are a lot of reports this week.",
            ],
            "intents": [
                {
                    "users": [
                        "Someone stole my purse! What do I do?",
                        "I want to report a thief.",
                        "My horse was taken from the stable last night.",
                        "Who do I talk to about a crime?",
                    ],
                    3: ["Come to the guardhouse and describe the thief. We will send a patrol to the market and the alleys."],
                    4: ["At the guardhouse by the fountain, give Clerk Oda the time, place and a description. We check the pawn shops by tomorrow noon."],
                },
                {
                    "users": [
                        "A man attacked me in the alley. Can you help?",
                        "I saw someone break into a shop.",
                        "A thief just ran past me with a stolen bag!",
                    ],
                    3: ["Tell me what they looked like and where it happened. I will pass it to the night watch right away."],
                    4: ["Describe them now: height, clothes, which way they ran. I will send two men to the east alley and the docks. Do not chase them."],
                },
            ],
        },
        "dangers": {
            2: [
                "There is trouble out there. Bandits, wolves, the usual. Be careful.",
                "Some roads are worse than others. Travel in daylight if you can.",
            ],
            "intents": [
                {
                    "users": [
                        "Is the road north safe?",
                        "Are there bandits around here?",
                        "Which way is safest to the next town?",
                        "Is it safe to travel at night?",
                    ],
                    3: ["Bandits have been seen on the south road, so take the north road instead. Travel by day and stay with other travelers."],
                    4: ["Take the north road; bandits hit two carts on the south road this week. Leave at dawn and reach the Stone Inn by dusk."],
                },
                {
                    "users": [
                        "I heard about monsters in the forest. Is it true?",
                        "What dangers should I watch for outside the walls?",
                        "What lives in the woods around here?",
                    ],
                    3: ["The forest has wolves and something bigger nobody has seen clearly. Stay on the road and make camp before dark."],
                    4: ["Wolves hunt the forest edge after dark, and something big broke the Hollow Farm fence. Stay on the road and travel in pairs."],
                },
            ],
        },
    },
    "merchant": {
        "supplies": {
            2: [
                "I sell a bit of everything. Have a look around the stall.",
                "Travelers usually buy rope and food. It depends where you are going.",
            ],
            "intents": [
                {
                    "users": [
                        "What supplies do I need for a long journey?",
                        "Do you have anything for camping?",
                        "What should I pack for a week on the road?",
                    ],
                    3: ["For a long trip, get rope, a waterskin, a tinderbox and a warm blanket. I have all of them here."],
                    4: ["Rope, fifty feet, four copper. Tinderbox, two. Waterskin, three. Wool blanket, one silver. That is one silver and nine copper, map included."],
                },
                {
                    "users": [
                        "I am heading into the mountains. What should I buy?",
                        "What do I need for a cold mountain pass?",
                        "I cross the high pass next week. What gear do I need?",
                    ],
                    3: ["Take torches, rope and dried food for the mountains. A good cloak matters more than people think."],
                    4: ["For the mountains: wool cloak, two silver; hooded lantern, one; rope; and six days of dried meat at one copper a day."],
                },
            ],
        },
        "prices": {
            2: [
                "Prices are prices. Maybe a little room, if you buy enough.",
                "I buy some things. Depends what it is and how much I can sell it for.",
            ],
            "intents": [
                {
                    "users": [
                        "Can you give me a better price?",
                        "That is too expensive. Will you haggle?",
                        "Is there a discount if I buy a lot?",
                    ],
                    3: ["Buy three items and I will take a tenth off. I also trade for furs and herbs if you have them."],
                    4: ["Buy five items and I take a fifth off. In trade, a clean wolf pelt is worth three silver, healing herbs one copper a bunch."],
                },
                {
                    "users": [
                        "Do you buy things from travelers?",
                        "How much will you give me for this old ring?",
                        "Would you trade instead of taking coin?",
                    ],
                    3: ["I buy jewelry and furs at fair prices. Show me what you have and I will make you an offer."],
                    4: [
                        "For a plain silver ring I pay four silver, or five in trade goods. That beats the pawnshop by the docks.",
                        "I buy rings, furs and herbs. A plain silver ring gets four silver, a clean wolf pelt three; take goods instead and I add a fifth.",
                    ],
                },
            ],
        },
        "roads": {
            2: [
                "I go where the coin is. The roads have been so-so this season.",
                "Some towns pay more than others. The capital, maybe.",
            ],
            "intents": [
                {
                    "users": [
                        "Which town has the best market?",
                        "Where can I sell furs for a good price?",
                        "Where are you traveling next?",
                    ],
                    3: ["I head to Westmere next. The market there pays well for furs, and the river road is open."],
                    4: [
                        "Westmere, four days west by the river road, pays double for furs. Avoid the east pass; a rockfall closed it.",
                        "The capital market opens at dawn on the first of the month; the bridge toll is one silver. Sell furs to the Copper Street tanner.",
                    ],
                },
                {
                    "users": [
                        "Are the trade roads open?",
                        "Which roads do the caravans use?",
                        "Is the east pass open?",
                    ],
                    3: ["The river road and the capital road are open, but the east pass is closed. Caravans prefer the river road."],
                    4: ["The river road to Westmere and the king's road to the capital are open; a rockfall closed the east pass. Caravans leave on market days."],
                },
            ],
        },
    },
    "herbalist": {
        "wounds": {
            2: [
                "Let me see it. It needs to be cleaned, that much is clear.",
                "I have salves for that sort of thing. Wounds are tricky, though.",
            ],
            "intents": [
                {
                    "users": [
                        "I have a bad cut on my arm. Can you help?",
                        "Do you have anything to stop bleeding?",
                        "Can you heal my wounds?",
                    ],
                    3: ["Wash it with boiled water, put yarrow paste on it and bind it with a clean cloth. Change it daily."],
                    4: ["Wash it with boiled, cooled water. Press on yarrow paste to stop the bleeding, bind it tight, and change the cloth each morning."],
                },
                {
                    "users": [
                        "How do I treat a wolf bite?",
                        "Something clawed my shoulder. Can you treat it?",
                        "My leg was hurt in a fight. What should I do?",
                    ],
                    3: ["Clean it well and use my marigold salve. Keep it covered and come back if it turns red or hot."],
                    4: ["Sit, and I will wash it with boiled water, apply yarrow paste and bind it. Two copper. Change the cloth daily for three days."],
                },
            ],
        },
        "remedies": {
            2: [
                "I have a few remedies on the shelf. It depends what is wrong with you.",
                "Herbs can help with that. Some work better than others.",
            ],
            "intents": [
                {
                    "users": [
                        "What do you have for a fever?",
                        "My brother is burning with fever. What helps?",
                        "I feel hot and shivery. Do you have medicine?",
                    ],
                    3: ["Willow bark tea brings a fever down. Drink it twice a day and rest in a cool room."],
                    4: ["Willow bark tea, one cup morning and night, two copper a bundle. Rest, drink water, and if the fever lasts three days, send for me."],
                },
                {
                    "users": [
                        "I cannot sleep at night. Do you have anything?",
                        "What helps with bad dreams?",
                        "Do you have a sleeping draught?",
                    ],
                    3: ["A cup of chamomile before bed helps, or a few drops of valerian if it is bad."],
                    4: ["Five valerian drops in warm milk at bedtime, no more. Three copper a bottle. Chamomile tea works for milder nights."],
                },
                {
                    "users": [
                        "What herbs should I carry on the road?",
                        "What should be in a traveler's medicine pouch?",
                        "Do you sell healing potions?",
                    ],
                    3: ["Carry yarrow for cuts, mint for the stomach and willow bark for pain. I also sell healing potions."],
                    4: ["Yarrow for cuts, mint for the stomach, willow bark for pain, two copper a bundle. Healing potions are one silver; drink them slowly."],
                },
            ],
        },
        "foraging": {
            2: [
                "Herbs grow all over if you know where to look. The forest, mostly.",
                "I always need herbs. Some are harder to find than others.",
            ],
            "intents": [
                {
                    "users": [
                        "Where can I find healing herbs?",
                        "Where does moonpetal grow?",
                        "Do you need any herbs collected?",
                        "Is there work for a forager?",
                    ],
                    3: ["Yarrow grows along the river banks and moonpetal in shady glades. Bring me some and I will pay you fairly."],
                    4: [
                        "Moonpetal grows in the birch glade north of the river and blooms at night. Pick it with gloves; I pay two silver for ten.",
                        "I pay one copper a bunch for riverbank yarrow, and two silver for ten moonpetals from the birch glade north of the river.",
                    ],
                },
                {
                    "users": [
                        "What plants are dangerous to touch?",
                        "Can you teach me which mushrooms are safe?",
                        "Which berries should I never eat?",
                    ],
                    3: ["Avoid the red-capped mushrooms and the purple nightshade. Yarrow and mint are safe and easy to find near the river."],
                    4: ["Never touch purple nightshade or its black berries, and never eat red-capped mushrooms. Brown caps from the oak wood are safe; if unsure, ask me."],
                },
            ],
        },
    },
    "sage": {
        "history": {
            2: [
                "That is an old story. There are books about it somewhere on these shelves.",
                "Many things happened long ago. Some of it is written down, some is lost.",
            ],
            "intents": [
                {
                    "users": [
                        "Who built the old castle on the hill?",
                        "Why is the old castle abandoned?",
                        "How old is the castle?",
                    ],
                    3: ["King Aldric built the castle two hundred years ago to guard the river. It stood empty after the plague."],
                    4: ["King Aldric built the castle in 312 to guard the ford, and it emptied after the plague of 540. Shelf three, red binding."],
                },
                {
                    "users": [
                        "Tell me about the war with the northern clans.",
                        "Why did we fight the northern clans?",
                        "How did the clan wars end?",
                    ],
                    3: ["The northern clans fought us for years over the salt mines. It ended with a peace treaty at Greywater."],
                    4: ["The clans fought us forty years over the salt mines, until the Greywater peace of 601. Tomas of Elm's history, shelf six, has it all."],
                },
                {
                    "users": [
                        "What is the history of this town?",
                        "How did this town begin?",
                        "What happened here in the old days?",
                    ],
                    3: ["The town grew from a river crossing. Traders settled here, and the walls were added after the clan wars."],
                    4: ["Ashford began as a ford and a ferry in the year 290. Salt traders settled, and the walls went up in 604. The town rolls are on shelf one."],
                },
            ],
        },
        "magic": {
            "intents": [
                {
                    "users": [
                        "Can you teach me magic?",
                        "How do I become a wizard?",
                        "Where should a beginner in magic start?",
                        "Do you have any books on spells?",
                    ],
                    2: ["Magic takes years of study. There are a few books that might help you start."],
                    3: ["Start with the Primer of Lesser Runes on the lower shelf, and practice one sign a day until it comes easily."],
                    4: ["Study the Primer of Lesser Runes, shelf two, for a month, then take the tower mage's test on the first day of spring."],
                },
                {
                    "users": [
                        "What does this strange rune mean?",
                        "Can you read this old scroll for me?",
                        "What is this symbol carved on my door?",
                    ],
                    2: ["Runes like that have many meanings. It depends on where you found it."],
                    3: ["That rune means ward, or protection. It is carved on doors and old graves to keep things out."],
                    4: ["That is Ansk, the ward rune. Chalked on a door, it bars small spirits for one night. Shelf two holds forty more."],
                },
            ],
        },
        "books": {
            2: [
                "We have many books. Finding the right one is another matter.",
                "There are maps and bestiaries somewhere. The shelves are not in perfect order.",
            ],
            "intents": [
                {
                    "users": [
                        "Can I borrow a book?",
                        "Where can I find a map of the kingdom?",
                        "How is the library organized?",
                    ],
                    3: ["Books are sorted by subject. History is upstairs; maps and nature are downstairs. You may borrow most of them."],
                    4: ["Kingdom maps: drawer three by the window. The Great Bestiary: east wall, shelf four. Borrowing takes a one silver deposit, seven days."],
                },
                {
                    "users": [
                        "Do you have books about monsters?",
                        "I am looking for a book on dragons.",
                        "Where would I read about trolls?",
                    ],
                    3: ["Books on beasts are downstairs on the east wall. You may read them here, or borrow one for a deposit."],
                    4: [
                        "Dragons are in Holm's Bestiary, chapter nine, east wall, shelf four. Borrow it a week for a one silver deposit; sign the ledger.",
                        "Holm's Bestiary, east wall, shelf four, covers dragons, trolls and wolves. Borrow it a week for a one silver deposit.",
                    ],
                },
            ],
        },
    },
    "stablemaster": {
        "horses": {
            2: [
                "I have a few horses in the stalls. Prices vary by age and temper.",
                "Some are fast, some are steady. Have a look and pick one you like.",
            ],
            "intents": [
                {
                    "users": [
                        "I want to buy a horse. What do you have?",
                        "Which horse is best for a long journey?",
                        "How much does a good horse cost?",
                        "Can I rent a horse instead of buying one?",
                    ],
                    3: ["For a long ride, take the grey mare. She is steady and does not spook. I also rent by the day."],
                    4: ["The grey mare, forty silver, is strong for long roads. The brown gelding, twenty-five, suits beginners. Renting is two silver a day."],
                },
                {
                    "users": [
                        "Do you have a horse that is fast?",
                        "I have never ridden before. Which horse is gentle?",
                        "Which horse would suit a nervous rider?",
                    ],
                    3: ["The black colt is the fastest but needs a firm hand. The old brown gelding is gentle and right for beginners."],
                    4: ["For speed, the black colt at sixty silver, for firm riders only. For a first horse, old Bess the chestnut, thirty silver with saddle."],
                },
            ],
        },
        "care": {
            2: [
                "Horses are delicate. Bring it in and I will look at it when I can.",
                "Feed and rest matter. Every horse is a little different.",
            ],
            "intents": [
                {
                    "users": [
                        "My horse is limping. What should I do?",
                        "My horse favors its front leg. Why?",
                        "Can you shoe my horse?",
                    ],
                    3: ["Check the hoof for stones first, then rest it on soft ground. I can shoe it for you too."],
                    4: ["Clean the hoof; a stone is the usual cause. Still limping? Rest it two days with a cold wrap. Shoeing is two silver."],
                },
                {
                    "users": [
                        "How often should I feed my horse?",
                        "How do I keep my horse healthy on the road?",
                        "My horse will not eat. Is something wrong?",
                    ],
                    3: ["Feed it hay morning and evening, with oats on hard days. Let it drink often and rest every few hours."],
                    4: ["Hay twice a day, oats on working days, water every two hours. Rest ten minutes each hour. Off its food? Check the teeth."],
                },
                {
                    "users": [
                        "Can I stable my horse here for the night?",
                        "How much to keep my horse here for a week?",
                        "Is there room in your stable?",
                    ],
                    3: ["Yes, there is a free stall. I feed and water it, and you pay by the night."],
                    4: ["Stall six is free. One silver a night or five for a week, hay and water included; oats are two copper extra."],
                },
            ],
        },
        "riding": {
            2: [
                "Riding takes practice. You will fall a few times; everyone does.",
                "Horses know when you are nervous. That part is up to you.",
            ],
            "intents": [
                {
                    "users": [
                        "Can you teach me to ride?",
                        "How do I get my horse to go faster?",
                        "My horse keeps throwing me off. Any advice?",
                    ],
                    3: ["Sit up straight, keep your heels down and hold the reins loosely. Squeeze with your legs to go faster."],
                    4: ["Lessons are one silver an hour, dawn in the paddock. Heels down, back straight, reins loose. Squeeze to go; sit deep to stop."],
                },
                {
                    "users": [
                        "How do I calm a nervous horse?",
                        "How do I get a horse to trust me?",
                        "My horse is scared of me. What do I do?",
                    ],
                    3: ["Move slowly and speak in a calm voice. A calm horse starts with a calm rider."],
                    4: ["Stand at the horse's shoulder, not its face. Speak low, let it smell your hand, and give it apple after every ride."],
                },
                {
                    "users": [
                        "What is the right way to saddle a horse?",
                        "How tight should the girth be?",
                        "Can you show me how to saddle up?",
                    ],
                    3: ["Put the saddle just behind the shoulders and tighten the girth slowly. Check it twice and mount from the left."],
                    4: ["Blanket first, then the saddle just behind the withers. Tighten the girth in two steps, until two fingers fit under it. Mount from the left."],
                },
            ],
        },
    },
    "ferryman": {
        "crossing": {
            2: [
                "I cross when there are enough passengers. The price is fair, more or less.",
                "The ferry runs most days. Depends on the river and my back.",
            ],
            "intents": [
                {
                    "users": [
                        "How much to cross the river?",
                        "Can my horse come on the ferry too?",
                        "Can you take me to the other side?",
                    ],
                    3: ["It is two copper a person and five for a horse. I cross every hour while there is daylight."],
                    4: ["Two copper a head, five a horse, paid up front. I cross hourly from dawn to dusk, a quarter hour each way."],
                },
                {
                    "users": [
                        "When does the next ferry leave?",
                        "Is the ferry running today?",
                        "How long does the crossing take?",
                    ],
                    3: ["Get on; I leave when the bell rings. The crossing takes a quarter hour if the river is calm."],
                    4: ["Next crossing is at the bell, in ten minutes, and takes a quarter hour. I run every hour from dawn to dusk unless it floods."],
                },
            ],
        },
        "river": {
            "intents": [
                {
                    "users": [
                        "Is the river safe to swim?",
                        "Can I walk across at the shallows?",
                        "How deep is the river here?",
                    ],
                    2: ["The river has its moods. Some days it is gentle, some days it is not."],
                    3: ["Do not swim here; the current is strong near the middle. The shallows downstream are safe to wade in late summer."],
                    4: ["Never swim past the reeds; the middle is deep and pulls hard. Wade only at the three stones, knee-deep in late summer."],
                },
                {
                    "users": [
                        "Where is the best place to fish?",
                        "What lives in the river?",
                        "What fish can I catch here?",
                    ],
                    2: ["There are fish in there, and other things. Depends where you look."],
                    3: ["Trout and eels, mostly. The best fishing is at the willow bend, early in the day."],
                    4: ["Trout and eels. Fish the willow bend at dawn with worms, and avoid the deep pool by the mill; it snags lines."],
                },
                {
                    "users": [
                        "Is there a bridge anywhere nearby?",
                        "Is there another way across?",
                        "How far is the nearest bridge?",
                    ],
                    2: ["There is a bridge up north, I think. A long walk, though."],
                    3: ["The old stone bridge is a day's walk north, if you do not want the ferry."],
                    4: ["The stone bridge is eighteen miles upriver, a day on the north bank path. Its toll is one copper; mine is two, but saves the day."],
                },
            ],
        },
        "shore": {
            2: [
                "There is land over there, and people. Not much else to say.",
                "I have seen a lot of things on this water. Most of them were fish.",
            ],
            "intents": [
                {
                    "users": [
                        "What is on the other side of the river?",
                        "Is there a village across the river?",
                        "Is the far shore dangerous?",
                    ],
                    3: ["The far shore has a village, Reedmoor, and a road into the marshes. Stay on the road and you will be fine."],
                    4: ["Across is Reedmoor, forty houses, an hour's walk on the causeway. Beyond lie the marshes; keep to the marked posts and carry a lantern."],
                },
                {
                    "users": [
                        "Have you seen anything strange on the water?",
                        "Who else have you taken across today?",
                        "Did anyone odd cross recently?",
                    ],
                    3: ["A man in a grey cloak crossed this morning, heading east. He paid in old coins and said nothing."],
                    4: ["A man in a grey cloak crossed at dawn, paid in old coins and took the causeway east, then the left path at the hanging bell."],
                },
                {
                    "users": [
                        "Where does this river lead?",
                        "Does this river reach the sea?",
                        "Can I sail down this river?",
                    ],
                    3: ["The river runs south past Reedmoor to the sea. Barges go down it in summer."],
                    4: ["South past Reedmoor and the salt towns to the sea at Gullhaven, six days by barge. Barges leave the mill dock weekly in summer."],
                },
            ],
        },
    },
}

# Helpfulness 0 that fits any NPC: irrelevant or flatly dismissive, no joke, plain wording.
GENERIC_DISMISS = [
    "Strange weather this week, rain at dawn and wind at night. Anyway, I cannot help you.",
    "Sorry, I was not listening. I was thinking about my supper.",
    "Ask someone else. Today is not a good day for questions.",
    "Have you seen a grey cat around here? No? Then I have nothing for you.",
    "Does it look like I care? I have my own troubles today.",
    "My brother still owes me money. That is all I can think about right now.",
]

# Optional openers for player lines (the same set in every NPC's mouth).
GREETINGS = [
    "Hello. ",
    "Good day. ",
    "Excuse me. ",
    "Greetings. ",
    "Hey there. ",
    "Good evening. ",
    "Pardon me. ",
    "Well met. ",
    "Sorry to bother you. ",
    "Hi. ",
]

# Held-out player lines for the steerability grid: each on a topic the data covers, but with
# wording that appears nowhere in rated.jsonl or unrated.jsonl (checked at build time).
PROMPTS = [
    # (npc, persona index, topic, intent index, player line)
    ("blacksmith", 0, "repair", 1, "My sword broke in half during a fight. Can you repair it?"),
    ("blacksmith", 1, "armor", 0, "What armor would you suggest for a long trip through the hills?"),
    ("innkeeper", 0, "room", 0, "Is there a free bed for me and my dog tonight?"),
    ("innkeeper", 1, "rumors", 0, "Do you know of anyone who needs a hired hand?"),
    ("guard", 0, "gate", 0, "What are the rules for entering town with a cart?"),
    ("guard", 1, "crime", 0, "Someone took my bag at the market. What should I do?"),
    ("merchant", 0, "supplies", 0, "I am going on a long trip. What should I buy from you?"),
    ("merchant", 1, "prices", 1, "Would you pay me for a fox pelt?"),
    ("herbalist", 0, "wounds", 1, "A boar gored my leg. How do I treat it?"),
    ("herbalist", 1, "remedies", 0, "I have a fever and chills. What should I take?"),
    ("sage", 0, "history", 0, "Who lived in the castle on the hill?"),
    ("sage", 1, "magic", 1, "Can you explain what this glowing symbol means?"),
    ("stablemaster", 0, "horses", 1, "Which of your horses would suit a beginner?"),
    ("stablemaster", 1, "care", 1, "My horse seems tired and weak. How can I help it?"),
    ("ferryman", 0, "crossing", 0, "What does it cost to take a cart across?"),
    ("ferryman", 1, "shore", 0, "Is there anything dangerous across the water?"),
]


# --------------------------------------------------------------------------------- assembly
def _balanced_levels(rng: random.Random, n: int) -> list[int]:
    """``n`` values spread as evenly as possible over 0..4, in random order."""
    values = [i % 5 for i in range(n)]
    rng.shuffle(values)
    return values


def _help_core(rng: random.Random, npc: dict, topic: dict, intent: dict, level: int) -> str:
    if level == 0:
        # Two thirds NPC-specific dismissals, one third generic/irrelevant ones.
        pool = npc["dismiss"] if rng.random() < 2 / 3 else GENERIC_DISMISS
        return rng.choice(pool)
    if level == 1:
        return rng.choice(npc["vague"])
    # The intent's own partial answer when it has one, else the topic's shared one.
    return rng.choice(intent.get(level) or topic[level])


def compose_reply(rng: random.Random, npc: dict, topic: dict, intent: dict, levels: dict[str, int]) -> str:
    parts = []
    if levels["creativity"]:
        parts.append(rng.choice(npc["creative"][levels["creativity"]]))
    parts.append(_help_core(rng, npc, topic, intent, levels["helpfulness"]))
    if levels["humor"]:
        parts.append(rng.choice(npc["humor"][levels["humor"]]))
    return " ".join(parts)


def generate(
    seed: int, n: int, prefix: str, with_labels: bool, exclude: set[tuple] | None = None
) -> tuple[list[dict], dict[str, list[int]]]:
    """``n`` conversations and the attribute levels they were built with (written out as
    ``labels`` only when ``with_labels``). Rows whose (system, user, reply) is in ``exclude``
    or already drawn are redrawn, so every row is unique."""
    rng = random.Random(seed)
    columns = {name: _balanced_levels(rng, n) for name in ATTRIBUTES}
    npc_names = list(NPCS)
    npc_column = [npc_names[i % len(npc_names)] for i in range(n)]  # NPCs balanced too
    rng.shuffle(npc_column)
    seen = set(exclude or ())
    rows = []
    for i in range(n):
        levels = {name: columns[name][i] for name in ATTRIBUTES}
        npc_name = npc_column[i]
        npc = NPCS[npc_name]
        for _attempt in range(1000):
            topic_name = rng.choice(list(TOPICS[npc_name]))
            topic = TOPICS[npc_name][topic_name]
            k = rng.randrange(len(topic["intents"]))
            intent = topic["intents"][k]
            user = rng.choice(intent["users"])
            if rng.random() < GREETING_PROB:
                user = rng.choice(GREETINGS) + user
            system = rng.choice(npc["personas"]) if rng.random() < PERSONA_PROB else None
            reply = compose_reply(rng, npc, topic, intent, levels)
            key = (system, user, reply)
            if key not in seen:
                break
        else:  # pragma: no cover - the library is far larger than the row counts
            raise RuntimeError("could not draw a fresh row; enlarge the fragment library")
        seen.add(key)
        messages = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": user})
        assistant = {"role": "assistant", "content": reply}
        if with_labels:
            assistant["labels"] = {name: levels[name] for name in ATTRIBUTES}
        messages.append(assistant)
        rows.append(
            {
                "id": f"{prefix}-{i + 1:05d}",
                # One group per request (all its wordings share the same answer cores).
                "group": f"{npc_name}-{topic_name}-{k + 1}",
                "source": SOURCE,
                "messages": messages,
                "meta": {"npc": npc_name},
            }
        )
    return rows, columns


def _row_key(row: dict) -> tuple:
    msgs = row["messages"]
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    return (system, msgs[-2]["content"], msgs[-1]["content"])


def build_prompts() -> list[dict]:
    out = []
    for i, (npc_name, persona_idx, topic_name, intent_idx, user) in enumerate(PROMPTS):
        assert intent_idx < len(TOPICS[npc_name][topic_name]["intents"]), (npc_name, topic_name)
        out.append(
            {
                "id": f"prompt-{i + 1:02d}",
                "npc": npc_name,
                "system": NPCS[npc_name]["personas"][persona_idx],
                "user": user,
                "group": f"{npc_name}-{topic_name}-{intent_idx + 1}",
            }
        )
    return out


def fragment_count() -> dict[str, int]:
    counts = {"personas": 0, "player_lines": 0, "help_cores": 0, "humor": 0, "creativity": 0}
    for npc_name, npc in NPCS.items():
        counts["personas"] += len(npc["personas"])
        counts["help_cores"] += len(npc["vague"]) + len(npc["dismiss"])
        for topic in TOPICS[npc_name].values():
            counts["help_cores"] += len(topic.get(2, []))
            for intent in topic["intents"]:
                counts["player_lines"] += len(intent["users"])
                counts["help_cores"] += sum(len(intent.get(level, [])) for level in (2, 3, 4))
        counts["humor"] += sum(len(v) for v in npc["humor"].values())
        counts["creativity"] += sum(len(v) for v in npc["creative"].values())
    counts["help_cores"] += len(GENERIC_DISMISS)
    counts["greetings"] = len(GREETINGS)
    counts["total"] = sum(counts.values())
    return counts


def _dump(rows: list[dict], path: Path) -> None:
    # Compact separators keep the files small; any JSON reader parses them the same way.
    text = "".join(json.dumps(row, ensure_ascii=True, separators=(",", ":")) + "\n" for row in rows)
    path.write_bytes(text.encode("ascii"))


# ------------------------------------------------------------------------------------ stats
def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / (sxx * syy) ** 0.5


def spearman(xs: list[float], ys: list[float]) -> float:
    return pearson(_ranks(xs), _ranks(ys))


def stats(rows: list[dict], levels: dict[str, list[int]] | None = None) -> str:
    lines = [f"rows: {len(rows)}"]
    words = [len(r["messages"][-1]["content"].split()) for r in rows]
    lines.append(f"reply words: min {min(words)}, mean {sum(words) / len(words):.1f}, max {max(words)}")
    lines.append(f"distinct replies: {len({r['messages'][-1]['content'] for r in rows})}")
    lines.append(f"groups: {len({r['group'] for r in rows})}")
    npcs: dict[str, int] = {}
    for r in rows:
        npcs[r["meta"]["npc"]] = npcs.get(r["meta"]["npc"], 0) + 1
    lines.append("npcs: " + ", ".join(f"{k} {v}" for k, v in npcs.items()))
    if levels is None:
        if "labels" not in rows[0]["messages"][-1]:
            return "\n".join(lines)
        levels = {a: [r["messages"][-1]["labels"][a] for r in rows] for a in ATTRIBUTES}
    for a in ATTRIBUTES:
        hist = [levels[a].count(v) for v in range(5)]
        lines.append(f"{a:12s} 0..4: {hist}")
    for i, a in enumerate(ATTRIBUTES):
        for b in ATTRIBUTES[i + 1 :]:
            lines.append(
                f"corr {a}/{b}: pearson {pearson(levels[a], levels[b]):+.3f}, "
                f"spearman {spearman(levels[a], levels[b]):+.3f}"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- main
def build(out_dir: Path) -> dict[str, list[dict]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rated, rated_levels = generate(RATED_SEED, N_RATED, "rated", with_labels=True)
    unrated, unrated_levels = generate(
        UNRATED_SEED, N_UNRATED, "unrated", with_labels=False, exclude={_row_key(r) for r in rated}
    )
    prompts = build_prompts()
    # Held-out prompts must not appear verbatim (with or without a greeting) in the training data.
    held_out = {p["user"] for p in prompts}
    for row in rated + unrated:
        user = row["messages"][-2]["content"]
        assert not any(user.endswith(h) for h in held_out), user
    _dump(rated, out_dir / "rated.jsonl")
    _dump(unrated, out_dir / "unrated.jsonl")
    _dump(prompts, out_dir / "prompts.jsonl")
    return {
        "rated": rated,
        "unrated": unrated,
        "prompts": prompts,
        "rated_levels": rated_levels,
        "unrated_levels": unrated_levels,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="output folder")
    parser.add_argument("--stats", action="store_true", help="print histograms and correlations")
    args = parser.parse_args(argv)
    data = build(args.out)
    for name in ("rated", "unrated", "prompts"):
        path = args.out / f"{name}.jsonl"
        print(f"wrote {path} ({len(data[name])} rows, {path.stat().st_size} bytes)")
    if args.stats:
        print("fragments: " + ", ".join(f"{k} {v}" for k, v in fragment_count().items()))
        print("== rated ==")
        print(stats(data["rated"]))
        print("== unrated (levels it was built with; not written to the file) ==")
        print(stats(data["unrated"], data["unrated_levels"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
