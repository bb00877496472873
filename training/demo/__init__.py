"""``steer demo``: the whole pipeline offline on the bundled NPC data.

- ``pipeline.py``: the stages and the report (``steer demo``);
- ``pretrained.py``: the ``--base-model`` mode (LoRA on a pretrained chat model, beside prompt steering);
- ``tiny_model.py``: the tiny tokenizer and Llama the default demo builds and pretrains;
- ``build_data.py`` + ``fragments.json``: the generator of the bundled demo data (its output ships
  in ``steer/demo_data``; the generator does not belong to the library).
"""
