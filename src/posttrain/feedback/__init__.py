"""Feedback on served completions: the store (:mod:`.store`) and its export to KTO/DPO/SFT data (:mod:`.export`)."""
