"""subtomo.ctf"""
