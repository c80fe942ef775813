"""Forecasters: the online baseline, LSTM and TFT, their training and registry."""
