"""looplift.recipes.asr: speech recognition on synthesized speech (CTC, transducer and attention decoders)."""
