"""Images and prompts to scores, and what is made of scores: validation and each benchmark's metric, rankings,
comparisons of scorers, generator leaderboards, best-of-N, calibration, intervals, the score cache, pictures.
"""
