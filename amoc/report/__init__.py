"""`amoc report`: every stage's outputs as one markdown report and seaborn figures.

- `stage`: the entry point; pre-training and downstream tables, training and robustness
  curves, accuracy bars.
- `robustness`: corruption heat-maps, the transfer matrix and their markdown tables.
- `render`: what both share (number formatting, atomic PNG writes).
"""
