"""subtomo.reconstruct"""
