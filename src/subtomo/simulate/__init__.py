"""subtomo.simulate"""
