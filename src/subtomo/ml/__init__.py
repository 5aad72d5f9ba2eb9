"""subtomo.ml"""
