"""What the quantized model is and costs: comparison with float, explanations, bit search, reports
and plots, evaluation on data sets, progress bars.
"""
