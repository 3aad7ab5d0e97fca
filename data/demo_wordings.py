"""What the demo's instructions say: topics, task sentences and constraint wordings, split in two.

A demo that claims "the tuned model follows instructions" must test it on instructions it never
saw. Everything a prompt is made of therefore comes in two disjoint halves:

    TRAIN_*     used to build the back-translated training pairs (data/backtranslate.py)
    HELDOUT_*   used only for the evaluation items

* topics        what the story is about ("a poor fisherman" vs "a young sailor");
* tasks         the request around the topic ("Write a short story about ..." vs "Compose a
                brief tale featuring ...");
* wordings      how each constraint is stated: for every IFEval instruction id, training
                wordings (the first is IFEval's own sentence, `describe_instruction`) and
                paraphrases kept back for the evaluation;
* kwargs        open-ended values are disjoint too (end phrases, keywords, word limits);
                values from a tiny fixed set (the postscript marker, 2-4 paragraphs) cannot be
                and are shared, with new topics, tasks and wordings around them.

Wordings are format strings over the instruction's IFEval kwargs (plus `{keywords_text}` for a
keyword list). tests/test_backtranslate.py checks that the halves do not overlap.
"""
from __future__ import annotations

TRAIN_TOPICS = [
    "a poor fisherman", "an old king", "a little fox", "a brave girl", "a wicked witch",
    "a lonely giant", "a clever tailor", "a hungry wolf", "a young prince", "a kind farmer",
    "a lost dog", "a proud queen", "a tired soldier", "a wise owl", "a greedy merchant",
    "a little bird", "a poor widow", "a magic ring", "a dark forest", "an old castle",
    "a golden apple", "a silver key", "a great ship", "a small village", "a cruel stepmother",
    "a faithful servant", "a little mouse", "a rich lady", "a beggar boy", "a black horse",
    "a good doctor", "a strange letter", "a cold winter", "a deep well", "an honest woodcutter",
    "a little house", "a brave knight", "a young girl", "an old shepherd", "a white cat",
]
HELDOUT_TOPICS = [
    "a young sailor", "a clever miller", "a sleepy bear", "an old gardener", "a proud rooster",
    "a silent monk", "a lost princess", "a tall tower", "a jolly baker", "a wandering minstrel",
    "a secret door", "a shy rabbit", "a stern schoolmaster", "a painted box", "a mountain road",
]

TRAIN_TASKS = [
    "Write a short story about {topic}.",
    "Tell me a story about {topic}.",
    "Write a few sentences about {topic}.",
    "Write a short tale about {topic}.",
]
HELDOUT_TASKS = [
    "Compose a brief tale featuring {topic}.",
    "Could you describe {topic} in a little story?",
]

# The same openers start every teacher text, train or held-out topic alike.
OPENERS = [
    "Once upon a time there was {topic}.",
    "There was once {topic}.",
    "Long ago there lived {topic}.",
    "This is the story of {topic}.",
]

# instruction id -> {"train": [...], "heldout": [...]} wordings; train[0] is IFEval's own sentence
WORDINGS = {
    "change_case:english_lowercase": {
        "train": [None, "Write your whole answer in lowercase letters only.",
                  "Use only lowercase letters; do not use any capital letters."],
        "heldout": ["Please reply entirely in lowercase, with no capitals anywhere.",
                    "Every letter of your response must be lowercase."],
    },
    "change_case:english_capital": {
        "train": [None, "Write your whole answer in capital letters only.",
                  "Use only capital letters in your answer; no lowercase letters."],
        "heldout": ["Please reply entirely in uppercase letters.",
                    "Every letter of your response must be a capital letter."],
    },
    "punctuation:no_comma": {
        "train": [None, "Do not use any commas in your answer.", "Write your answer without commas."],
        "heldout": ["Avoid commas completely in your reply.",
                    "Your response must not contain a single comma."],
    },
    "startend:quotation": {
        "train": [None, "Put your whole answer inside double quotes.",
                  "Your answer must begin and end with a double quotation mark."],
        "heldout": ["Enclose the entire reply in double quotation marks.",
                    "Wrap everything you write in double quotes."],
    },
    "detectable_format:title": {
        "train": [None, "Give your answer a title in double angular brackets, like <<title>>.",
                  "Start with a title wrapped in << and >>."],
        "heldout": ["Include a title surrounded by double angle brackets, for example <<my title>>.",
                    "Your reply needs a title written as <<title>>."],
    },
    "detectable_content:postscript": {
        "train": [None, "End your answer with a postscript that starts with {postscript_marker}",
                  "Add a postscript at the end, beginning with {postscript_marker}"],
        "heldout": ["After your answer, add a note that begins with {postscript_marker}",
                    "Please finish with a postscript marked {postscript_marker}"],
    },
    "startend:end_checker": {
        "train": [None, "End your answer with the exact words: {end_phrase}",
                  "The last words of your answer must be: {end_phrase}"],
        "heldout": ["Make sure your reply ends with this phrase: {end_phrase}",
                    "Close your response with exactly these words: {end_phrase}"],
    },
    "detectable_format:number_highlighted_sections": {
        "train": [None, "Highlight at least {num_highlights} parts of your answer with *asterisks*.",
                  "Mark at least {num_highlights} phrases as *highlighted* using markdown."],
        "heldout": ["Emphasize {num_highlights} or more phrases by wrapping them in single asterisks, like *this*.",
                    "Use markdown to highlight at least {num_highlights} sections, e.g. *important part*."],
    },
    "length_constraints:number_paragraphs": {
        "train": [None, "Write exactly {num_paragraphs} paragraphs, separated by the divider ***",
                  "Your answer must have {num_paragraphs} paragraphs with *** between them."],
        "heldout": ["Split your reply into {num_paragraphs} paragraphs, putting *** between paragraphs.",
                    "Use {num_paragraphs} paragraphs in total and separate them with the markdown divider ***"],
    },
    "length_constraints:number_words": {
        "train": [None, "Use {relation} {num_words} words.", "Your answer must have {relation} {num_words} words."],
        "heldout": ["Keep the reply {relation} {num_words} words long.",
                    "The response should contain {relation} {num_words} words in total."],
    },
    "keywords:existence": {
        "train": [None, "Make sure to use the words {keywords_text} in your answer.",
                  "Your answer must mention {keywords_text}."],
        "heldout": ["Be sure the words {keywords_text} appear in your reply.",
                    "Work the words {keywords_text} into your response."],
    },
    "detectable_format:constrained_response": {
        "train": [None, "Start your answer with 'My answer is yes.', 'My answer is no.' or 'My answer is maybe.'",
                  "Begin with one of: My answer is yes. / My answer is no. / My answer is maybe."],
        "heldout": ["Your reply must include one of these: 'My answer is yes.', 'My answer is no.', 'My answer is maybe.'",
                    "Pick one of 'My answer is yes.', 'My answer is no.' or 'My answer is maybe.' and say it first."],
    },
    "combination:two_responses": {
        "train": [None, "Write two different answers separated by six asterisks: ******",
                  "Give two different versions, with ****** between them."],
        "heldout": ["Provide two distinct replies and put ****** between them.",
                    "Answer twice in two different ways, separating the answers with ******."],
    },
    "detectable_content:number_placeholders": {
        "train": [None, "Include at least {num_placeholders} placeholders in square brackets, like [name].",
                  "Use at least {num_placeholders} placeholders written in square brackets, such as [place]."],
        "heldout": ["Put {num_placeholders} or more placeholders in square brackets into your reply, e.g. [time].",
                    "Your response should have at least {num_placeholders} bracketed placeholders like [city]."],
    },
}

# kwargs pools: open-ended values are disjoint between the halves
TRAIN_END_PHRASES = ["That is all.", "The end.", "And so it ended.", "Good night.",
                     "Nothing more happened.", "They lived happily ever after."]
HELDOUT_END_PHRASES = ["Is there anything else I can help with?", "And that was that.",
                       "Thank you for reading."]
# keywords for held-out items: everyday words that none of the training pairs asks for
HELDOUT_KEYWORDS = ["river", "lantern", "bread", "music", "garden", "window", "snow", "candle",
                    "bridge", "honey", "mirror", "storm"]
TRAIN_WORD_LIMITS = [15, 20, 30, 40, 50]
HELDOUT_WORD_LIMITS = [25, 35, 45]
POSTSCRIPT_MARKERS = ["P.S.", "P.P.S"]
