"""subtomo.fourier"""
